"""User namespaces for rootless runs: which ids map where, and entering a namespace with them.

Owns two things:
  - pure planning: `parse_subid` reads /etc/subuid or /etc/subgid text, `plan` turns the
    caller's ids plus their ranges into an IdMap (caller -> 0, then the subordinate range from
    1), or the single-id map (caller -> 0) when there is no range or no newuidmap/newgidmap;
  - `enter_userns`: unshare(CLONE_NEWUSER | extra) and apply the map. The single-id map is
    written by the process itself (setgroups "deny" first, as the kernel demands); a range map
    is written by newuidmap/newgidmap, run by a helper process forked *before* the unshare, so
    it stays in the parent user namespace where those set-uid helpers work. If a helper fails,
    the single-id map is written instead and the returned IdMap says so (method "single").
  - `call_in_userns`: run a function in a forked child inside a namespace with a recorded map
    (used by rm/export, so files owned by subordinate ids can be read and removed).
Invariant: after enter_userns the process is uid 0 / gid 0 inside, with all capabilities in the
new namespace; nothing here changes anything outside the calling process (and its helper).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sys
from collections.abc import Callable, Sequence

from mountctl import syscalls as sc
from unionfs.tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing stays out of `mountctl run`'s start-up)
    from typing import Any, Literal

    Method = Literal["none", "single", "newuidmap"]
HELPER_TIMEOUT = 30.0


class UserNsError(Exception):
    """A user namespace could not be created or mapped (the message says why)."""


class IdRange:
    """COUNT ids from INSIDE on in the namespace are the ids from OUTSIDE on outside it (one
    line of uid_map). (A value class by hand: a named tuple's `count` field would hide
    `tuple.count`, and the dataclasses module costs several ms of every mountctl start.)"""

    __slots__ = ("count", "inside", "outside")

    def __init__(self, inside: int, outside: int, count: int) -> None:
        self.inside = inside
        self.outside = outside
        self.count = count

    def _key(self) -> tuple[int, int, int]:
        return (self.inside, self.outside, self.count)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdRange) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"IdRange(inside={self.inside}, outside={self.outside}, count={self.count})"


class IdMap(NamedTuple):
    uids: tuple[IdRange, ...]
    gids: tuple[IdRange, ...]
    method: Method

    @property
    def rootless(self) -> bool:
        return self.method != "none"

    def uid_count(self) -> int:
        return sum(r.count for r in self.uids)

    def maps_uid(self, uid: int) -> bool:
        return any(r.inside <= uid < r.inside + r.count for r in self.uids)

    def maps_gid(self, gid: int) -> bool:
        return any(r.inside <= gid < r.inside + r.count for r in self.gids)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method,
                "uids": [[r.inside, r.outside, r.count] for r in self.uids],
                "gids": [[r.inside, r.outside, r.count] for r in self.gids]}

    @classmethod
    def from_json(cls, obj: Any) -> IdMap:
        if not isinstance(obj, dict):
            return HOST
        try:
            return cls(tuple(IdRange(*map(int, r)) for r in obj.get("uids", [])),
                       tuple(IdRange(*map(int, r)) for r in obj.get("gids", [])),
                       obj.get("method", "none"))
        except (TypeError, ValueError):
            return HOST


HOST = IdMap((), (), "none")
"""No user namespace (rootful)."""


def parse_subid(text: str, user: str, uid: int) -> list[tuple[int, int]]:
    """(start, count) ranges granted to `user` (by name or number) in subuid/subgid text."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            out.append((start, count))
    return out


def single(uid: int, gid: int) -> IdMap:
    return IdMap((IdRange(0, uid, 1),), (IdRange(0, gid, 1),), "single")


def plan(uid: int, gid: int, subuids: Sequence[tuple[int, int]],
         subgids: Sequence[tuple[int, int]], helpers: bool) -> IdMap:
    """The map a rootless run asks for: the caller as root, then their first subordinate
    range (at most 65535 ids, enough for uid 65534 'nobody') from id 1."""
    if not helpers or not subuids or not subgids:
        return single(uid, gid)
    us, uc = subuids[0]
    gs, gc = subgids[0]
    return IdMap((IdRange(0, uid, 1), IdRange(1, us, min(uc, 65535))),
                 (IdRange(0, gid, 1), IdRange(1, gs, min(gc, 65535))), "newuidmap")


# --------------------------------------------------------------------------- host facts


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def read_subids(path: str, uid: int) -> list[tuple[int, int]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    return parse_subid(text, user_name(uid), uid)


def helpers_present() -> bool:
    import shutil  # (its compression modules: 2 ms of every run's start-up)

    return bool(shutil.which("newuidmap") and shutil.which("newgidmap"))


def host_plan(uid: int | None = None, gid: int | None = None) -> IdMap:
    """The map a rootless run on this host would ask for."""
    u = os.getuid() if uid is None else uid
    g = os.getgid() if gid is None else gid
    return plan(u, g, read_subids("/etc/subuid", u), read_subids("/etc/subgid", u),
                helpers_present())


def current() -> IdMap:
    """The map of the calling process's user namespace (HOST in the initial one)."""
    def read(path: str) -> tuple[IdRange, ...]:
        with open(path) as f:
            return tuple(IdRange(*map(int, line.split())) for line in f if line.strip())
    uids, gids = read("/proc/self/uid_map"), read("/proc/self/gid_map")
    if uids == (IdRange(0, 0, 2**32 - 1),):
        return HOST
    method: Method = "single" if len(uids) == 1 and uids[0].count == 1 else "newuidmap"
    return IdMap(uids, gids, method)


# --------------------------------------------------------------------------- entering


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _map_text(ranges: Sequence[IdRange]) -> str:
    return "".join(f"{r.inside} {r.outside} {r.count}\n" for r in ranges)


def _is_empty(path: str) -> bool:
    with open(path) as f:
        return not f.read().strip()


def _write_single(outer_uid: int, outer_gid: int) -> None:
    if _is_empty("/proc/self/uid_map"):
        _write("/proc/self/uid_map", f"0 {outer_uid} 1\n")
    if _is_empty("/proc/self/gid_map"):
        with contextlib.suppress(OSError):
            _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"0 {outer_gid} 1\n")


def _run_helpers(target: int, idmap: IdMap) -> str:
    """newuidmap/newgidmap for process `target`; returns '' or what went wrong."""
    import subprocess  # (rootless runs with subordinate ids only: 3 ms of every start)

    errors = []
    for tool, ranges in (("newuidmap", idmap.uids), ("newgidmap", idmap.gids)):
        args = [tool, str(target)]
        for r in ranges:
            args += [str(r.inside), str(r.outside), str(r.count)]
        try:
            p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=HELPER_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{tool}: {e}")
            continue
        if p.returncode != 0:
            msg = p.stderr.decode(errors="replace").strip().splitlines()
            errors.append(f"{tool}: {msg[-1] if msg else f'exit status {p.returncode}'}")
    return "; ".join(errors)


def enter_userns(idmap: IdMap, extra_flags: int = 0) -> tuple[IdMap, str]:
    """Move the calling (single-threaded) process into a new user namespace (plus the
    namespaces in `extra_flags`, owned by it) and map ids as `idmap` says.

    Returns the map now in force and a note ('' or why the range map fell back to single)."""
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    note = ""
    if idmap.method == "newuidmap":
        me = os.getpid()
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        helper = os.fork()
        if helper == 0:  # pragma: no cover - runs in the forked helper
            code = 0
            try:
                os.close(go_w)
                os.close(res_r)
                if os.read(go_r, 1) == b"g":
                    os.write(res_w, _run_helpers(me, idmap).encode()[:4000])
            except BaseException:
                code = 1
            os._exit(code)
        os.close(go_r)
        os.close(res_w)
        try:
            try:
                sc.unshare(sc.CLONE_NEWUSER | extra_flags)
            except BaseException:
                os.write(go_w, b"a")
                raise
            os.write(go_w, b"g")
            os.close(go_w)
            go_w = -1
            chunks = []
            while chunk := os.read(res_r, 4096):
                chunks.append(chunk)
            note = b"".join(chunks).decode(errors="replace")
        finally:
            if go_w >= 0:
                os.close(go_w)
            os.close(res_r)
            os.waitpid(helper, 0)
        if note:
            _write_single(outer_uid, outer_gid)
    elif idmap.method == "single":
        sc.unshare(sc.CLONE_NEWUSER | extra_flags)
        _write_single(outer_uid, outer_gid)
    else:
        raise UserNsError("enter_userns needs a rootless id map")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    return current(), note


def setgroups_allowed() -> bool:
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() == "allow"
    except OSError:
        return True


def call_in_userns(idmap: IdMap, fn: Callable[[], None]) -> None:
    """Run `fn` in a forked child that entered a user namespace mapped like `idmap` (HOST:
    run it in a child anyway, without a namespace). Exceptions come back as UserNsError with
    their message; the child's output goes where the parent's does."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 0
        try:
            os.close(r)
            if idmap.rootless:
                wanted = idmap
                if idmap.method == "newuidmap" and not helpers_present():
                    wanted = single(os.geteuid(), os.getegid())
                enter_userns(wanted)
            fn()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.write(w, (str(e) or type(e).__name__).encode()[:4000])
            code = 1
        os._exit(code)
    os.close(w)
    try:
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    msg = b"".join(chunks).decode(errors="replace")
    if msg or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise UserNsError(msg or f"helper process failed (status {status})")
