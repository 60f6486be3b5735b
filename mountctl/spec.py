"""The container spec: what to run, built from the image config and the command line. Pure.

Owns the rules docker users expect:
  - argv = Entrypoint + Cmd. `--entrypoint E` replaces the Entrypoint with [E] (`""`: none) and
    drops the image's Cmd; CMD words on the command line replace the Cmd;
  - env = the image's Env, then each `-e K=V` (`-e K` copies K from the caller's environment,
    or is dropped when unset), later keys replacing earlier ones in place; PATH defaults to
    DEFAULT_PATH; HOME is filled in by the runner once the user is resolved (`with_home`);
  - workdir = `-w` (absolute) or the image WorkingDir (made absolute) or `/`;
  - user = `-u` or the image User, kept as text: names can only be resolved against the
    container's own /etc/passwd and /etc/group, which `resolve_user` parses (pure: the runner
    hands in the files' bytes);
  - volumes `SRC:DST[:ro|rw]`: SRC made absolute against the caller's cwd, DST absolute and
    not `/`, no two volumes on one DST.
No I/O happens here: every input is a parameter, every failure a SpecError with one line of text.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence

from mountctl.names import is_env_key, is_host_label, is_name
from unionfs.tuples import NamedTuple

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DRIVERS = ("auto", "fuse", "overlay")
TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing stays out of `mountctl run`'s start-up)
    from typing import Any, Literal

    Driver = Literal["auto", "fuse", "overlay"]
MAX_ID = 2**32 - 2



class SpecError(ValueError):
    """A flag or image setting that cannot be run (the message says which, in one line)."""


class Volume(NamedTuple):
    source: str
    target: str
    readonly: bool = False


class RunOptions(NamedTuple):
    """The `run` flags, as typed (nothing interpreted yet)."""

    command: tuple[str, ...] = ()
    entrypoint: str | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    volumes: tuple[str, ...] = ()
    driver: str = "auto"


class ContainerSpec(NamedTuple):
    argv: tuple[str, ...]
    env: tuple[str, ...]
    """`K=V` strings, unique keys, in first-seen order."""
    workdir: str
    user: str
    """`USER[:GROUP]`, names or numbers; "" means root."""
    hostname: str
    volumes: tuple[Volume, ...] = ()
    driver: Driver = "auto"

    def env_dict(self) -> dict[str, str]:
        return dict(e.split("=", 1) for e in self.env)

    def with_home(self, home: str) -> ContainerSpec:
        """The spec with HOME=home added unless the env already sets HOME."""
        if "HOME" in self.env_dict():
            return self
        return self._replace(env=(*self.env, f"HOME={home}"))

    def to_json(self) -> dict[str, Any]:
        return {"argv": list(self.argv), "env": list(self.env), "workdir": self.workdir,
                "user": self.user, "hostname": self.hostname, "driver": self.driver,
                "volumes": [{"source": v.source, "target": v.target, "readonly": v.readonly}
                            for v in self.volumes]}


# --------------------------------------------------------------------------- parsing flags


def check_name(name: str) -> str:
    """A container name: letters, digits, `_.-`, starting with a letter or digit."""
    if not is_name(name):
        raise SpecError(f"invalid container name {name!r}: use letters, digits, '_', '.', '-' "
                        "(starting with a letter or digit, at most 128 characters)")
    return name


def check_hostname(name: str) -> str:
    if not name or len(name) > 64 or not all(is_host_label(p) for p in name.split(".")):
        raise SpecError(f"invalid hostname {name!r}: dot-separated labels of letters, digits "
                        "and '-', at most 64 characters")
    return name


def parse_env(items: Sequence[str], host_env: Mapping[str, str], what: str) -> list[str]:
    """`K=V` items (and, from the command line, bare `K` taken from `host_env`)."""
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not is_env_key(key) or "\0" in value:
            raise SpecError(f"{what}: invalid environment variable {item!r} (expected KEY=VALUE)")
        if not eq:
            if key not in host_env:
                continue
            value = host_env[key]
        out.append(f"{key}={value}")
    return out


def merge_env(*groups: Sequence[str]) -> tuple[str, ...]:
    """Later keys replace earlier ones in place."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            key, _, value = item.partition("=")
            merged[key] = value
    return tuple(f"{k}={v}" for k, v in merged.items())


def _abs_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise SpecError(f"{what} {path!r} must be an absolute path")
    if "\0" in path:
        raise SpecError(f"{what} {path!r} contains a NUL byte")
    return posixpath.normpath(path).replace("//", "/")


def parse_volume(text: str, cwd: str) -> Volume:
    """`SRC:DST[:ro|rw]`; SRC relative to `cwd`."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise SpecError(f"invalid volume {text!r}: expected SRC:DST[:ro]")
    readonly = False
    if len(parts) == 3:
        opts = parts[2].split(",")
        for opt in opts:
            if opt not in ("ro", "rw"):
                raise SpecError(f"invalid volume {text!r}: unknown option {opt!r} "
                                "(expected ro or rw)")
        readonly = "ro" in opts
    src = parts[0] if parts[0].startswith("/") else posixpath.join(cwd, parts[0])
    dst = _abs_path(parts[1], f"volume {text!r}: destination")
    if dst == "/":
        raise SpecError(f"invalid volume {text!r}: cannot mount over the container's root")
    return Volume(_abs_path(src, f"volume {text!r}: source"), dst, readonly)


def _str_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SpecError(f"image config: {what} is not a list of strings")
    return list(value)


def image_settings(config_doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `config` object of an OCI image config document ({} when absent)."""
    cfg = config_doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise SpecError("image config: 'config' is not an object")
    return cfg


def build_spec(config_doc: Mapping[str, Any], opts: RunOptions, *, host_env: Mapping[str, str],
               cwd: str, default_hostname: str) -> ContainerSpec:
    """The spec for running an image (its OCI config document) with these flags."""
    cfg = image_settings(config_doc)
    if opts.driver not in DRIVERS:
        raise SpecError(f"invalid driver {opts.driver!r} (expected auto, fuse or overlay)")
    image_ep = _str_list(cfg.get("Entrypoint"), "Entrypoint") or []
    image_cmd = _str_list(cfg.get("Cmd"), "Cmd") or []
    if opts.entrypoint is not None:
        entrypoint = [opts.entrypoint] if opts.entrypoint else []
        cmd = list(opts.command)
    else:
        entrypoint = image_ep
        cmd = list(opts.command) if opts.command else image_cmd
    argv = tuple(entrypoint + cmd)
    if not argv:
        raise SpecError("no command to run: the image has no Entrypoint or Cmd; give one after "
                        "the image name")
    if any("\0" in a for a in argv):
        raise SpecError("the command contains a NUL byte")

    image_env = parse_env(_str_list(cfg.get("Env"), "Env") or [], {}, "image config Env")
    env = merge_env([f"PATH={DEFAULT_PATH}"], image_env,
                    parse_env(opts.env, host_env, "-e"))

    if opts.workdir is not None:
        workdir = _abs_path(opts.workdir, "working directory (-w)")
    else:
        wd = cfg.get("WorkingDir") or "/"
        if not isinstance(wd, str):
            raise SpecError("image config: WorkingDir is not a string")
        workdir = posixpath.normpath(posixpath.join("/", wd)).replace("//", "/")

    user = opts.user if opts.user is not None else (cfg.get("User") or "")
    if not isinstance(user, str):
        raise SpecError("image config: User is not a string")
    parse_user(user)

    hostname = check_hostname(opts.hostname if opts.hostname is not None else default_hostname)

    volumes = tuple(parse_volume(v, cwd) for v in opts.volumes)
    seen: set[str] = set()
    for v in volumes:
        if v.target in seen:
            raise SpecError(f"two volumes on {v.target}")
        seen.add(v.target)
    driver: Driver = opts.driver  # type: ignore[assignment]  # checked against DRIVERS above
    return ContainerSpec(argv=argv, env=env, workdir=workdir, user=user, hostname=hostname,
                         volumes=volumes, driver=driver)


# --------------------------------------------------------------------------- users


class PasswdEntry(NamedTuple):
    name: str
    uid: int
    gid: int
    home: str
    shell: str


class GroupEntry(NamedTuple):
    name: str
    gid: int
    members: tuple[str, ...]


class Ids(NamedTuple):
    """A resolved user: what setresuid/setresgid/setgroups get, and HOME."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _id(text: str) -> int | None:
    if text.isascii() and text.isdigit():
        n = int(text)
        if n > MAX_ID:
            raise SpecError(f"user or group id {text} is out of range")
        return n
    return None


def parse_user(user: str) -> tuple[str, str | None]:
    """`USER[:GROUP]` -> (user, group or None); checks the syntax only."""
    name, colon, group = user.partition(":")
    if colon and not group:
        raise SpecError(f"invalid user {user!r}: empty group after ':'")
    if (colon and not name) or ":" in group or any(c in user for c in "\0\n"):
        raise SpecError(f"invalid user {user!r}: expected USER[:GROUP] (names or numbers)")
    _id(name)
    if colon:
        _id(group)
    return name, (group if colon else None)


def _fields(text: bytes) -> list[list[str]]:
    out = []
    for raw in text.decode("utf-8", "surrogateescape").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "+", "-")):
            continue
        out.append(line.split(":"))
    return out


def parse_passwd(text: bytes) -> list[PasswdEntry]:
    """/etc/passwd lines; malformed lines are skipped (as libc does)."""
    out = []
    for f in _fields(text):
        if len(f) < 7 or not f[2].isdigit() or not f[3].isdigit():
            continue
        out.append(PasswdEntry(f[0], int(f[2]), int(f[3]), f[5], f[6]))
    return out


def parse_group(text: bytes) -> list[GroupEntry]:
    out = []
    for f in _fields(text):
        if len(f) < 4 or not f[2].isdigit():
            continue
        out.append(GroupEntry(f[0], int(f[2]), tuple(m for m in f[3].split(",") if m)))
    return out


def resolve_user(user: str, passwd: bytes | None, group: bytes | None) -> Ids:
    """Resolve `USER[:GROUP]` against the container's /etc/passwd and /etc/group contents
    (None: the file is missing). Numeric ids need no entry; names must exist. Without a
    GROUP, the gid is the passwd entry's (0 for an unknown numeric uid); supplementary groups
    are those of /etc/group listing the user's name."""
    uname, gname = parse_user(user or "0")
    users = parse_passwd(passwd or b"")
    groups = parse_group(group or b"")
    num = _id(uname)
    entry: PasswdEntry | None
    if num is None:
        entry = next((u for u in users if u.name == uname), None)
        if entry is None:
            raise SpecError(f"user {uname!r} not found in the container's /etc/passwd")
        uid = entry.uid
    else:
        uid = num
        entry = next((u for u in users if u.uid == uid), None)
    gid = entry.gid if entry is not None else 0
    if gname is not None:
        gnum = _id(gname)
        if gnum is None:
            gent = next((g for g in groups if g.name == gname), None)
            if gent is None:
                raise SpecError(f"group {gname!r} not found in the container's /etc/group")
            gid = gent.gid
        else:
            gid = gnum
    supplementary: list[int] = []
    if entry is not None:
        supplementary = [g.gid for g in groups if entry.name in g.members]
    allgroups = tuple(dict.fromkeys([gid, *supplementary]))
    home = entry.home if entry is not None and entry.home else "/"
    return Ids(uid, gid, allgroups, home)
