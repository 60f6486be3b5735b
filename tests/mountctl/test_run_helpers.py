"""Harness for the mountctl run tests (no tests here): run the real CLI, find leftovers.

`Mctl` runs `python -m mountctl --root ROOT ...` as a subprocess with a timeout, rootful, or
rootless: as uid 1000 inside a private mount namespace that the harness creates with
`unshare -m`, where a 0666 character device 10,229 is bound over /dev/fuse (the host's node is
never changed) and, when the interpreter, the venv or the project tree lives under a directory
uid 1000 cannot traverse (/root is 0700 here; a clone in `mktemp -d`'s directory), a tmpfs
replaces that directory in the private namespace with just the subtrees needed bound back in, so
no permission on the host is weakened. Optionally
/etc/subuid and /etc/subgid are replaced there too, by files granting uid 1000 a range.

`leftovers(root, mark)` lists mounts under ROOT and processes whose command line mentions ROOT
or whose environment holds MARK (every run gets `-e MCTEST=MARK`, so even the container's own
processes are found); `cleanup` kills and unmounts them, so a failing test leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.mounts import mount_points, unmount

TIMEOUT = 60.0
ROOTLESS_UID = 1000
SUBID_START = 200000


def _procs() -> Iterator[tuple[int, bytes, bytes]]:
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        yield int(d), cmd, env


def leftovers(root: Path, mark: str) -> tuple[list[str], list[tuple[int, str]]]:
    """(mounts under root, processes that belong to this test's runs)."""
    r = str(root)
    mounts = [mp for mp, _ in mount_points() if mp == r or mp.startswith(r + "/")]
    procs = []
    for pid, cmd, env in _procs():
        if r.encode() in cmd or f"MCTEST={mark}".encode() in env.split(b"\0"):
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().split(b") ")[1][:1] == b"Z":
                        continue  # a zombie waiting for our own wait()
            except OSError:
                continue
            procs.append((pid, cmd.replace(b"\0", b" ").decode(errors="replace")))
    return mounts, procs


def cleanup(root: Path, mark: str) -> tuple[list[str], list[tuple[int, str]]]:
    """Kill and unmount what leftovers() finds (after a grace period); return what was found."""
    deadline = time.monotonic() + 5
    found = leftovers(root, mark)
    while (found[0] or found[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
        found = leftovers(root, mark)
    for pid, _ in found[1]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for mp in reversed(found[0]):
        unmount(mp)
    return found


def _blocked_ancestor(path: str) -> str | None:
    """The topmost ancestor directory of `path` that 'other' users cannot traverse."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        d = str(Path(*parts[:i]))
        st = os.stat(d)
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH \
                and st.st_uid != ROOTLESS_UID:
            return d
    return None


def rootless_prelude(stage: Path, subids: bool) -> str:
    """Shell commands (run as root in the private mount namespace) preparing it for uid 1000."""
    q = shlex.quote
    lines = ["set -e", f"S={q(str(stage))}",
             "mount -t tmpfs -o mode=0755 tmpfs \"$S\"",
             "mknod -m 0666 \"$S/fuse\" c 10 229",
             "mount --bind \"$S/fuse\" /dev/fuse"]
    # what uid 1000 must reach: the interpreter, the venv and the project tree (a clone may
    # live in a 0700 directory, e.g. one made by mktemp -d)
    needed = {os.path.realpath(sys.executable), os.path.realpath(sys.prefix),
              str(Path(__file__).resolve().parents[2])}
    keep: dict[str, set[str]] = {}
    for path in needed:
        blocked = _blocked_ancestor(path)
        if blocked is not None:
            keep.setdefault(blocked, set()).add(
                f"{blocked}/{Path(path).relative_to(blocked).parts[0]}")
    n = 0
    for blocked, children in sorted(keep.items()):
        # e.g. /root (0700) -> a 0755 tmpfs on /root holding only /root/.pyenv, bound back
        kept = []
        for child in sorted(children):
            n += 1
            lines += [f"mkdir \"$S/keep{n}\"", f"mount --bind {q(child)} \"$S/keep{n}\""]
            kept.append((child, f"$S/keep{n}"))
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {q(blocked)}")
        for child, stash in kept:
            lines += [f"mkdir {q(child)}", f"mount --bind \"{stash}\" {q(child)}"]
    if subids:
        lines += [f"echo {ROOTLESS_UID}:{SUBID_START}:65536 > \"$S/subid\"",
                  "mount --bind \"$S/subid\" /etc/subuid",
                  "mount --bind \"$S/subid\" /etc/subgid"]
    return "\n".join(lines)


@dataclass
class Mctl:
    """The mountctl CLI against one store root."""

    root: Path
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    rootless: bool = False
    subids: bool = False
    env: dict[str, str] = field(default_factory=dict)
    stage: Path | None = None

    def close(self) -> None:
        if self.stage is not None:
            with contextlib.suppress(OSError):
                self.stage.rmdir()

    def cmd(self, *args: str) -> list[str]:
        args_l = list(args)
        if args_l and args_l[0] == "run":
            args_l.insert(1, f"--env=MCTEST={self.mark}")
        return [sys.executable, "-m", "mountctl", "--root", str(self.root), *args_l]

    def _wrap(self, argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, **self.env}
        if not self.rootless:
            return list(argv), env
        if self.stage is None:
            self.stage = Path(tempfile.mkdtemp(prefix="mctl-stage-"))
            os.chmod(self.stage, 0o755)
        stage = self.stage
        script = (rootless_prelude(stage, self.subids)
                  + f"\ncd /\nexec setpriv --reuid={ROOTLESS_UID} --regid={ROOTLESS_UID} "
                  "--clear-groups -- \"$@\"\n")
        env.update(HOME=str(self.root.parent), MCTEST=self.mark)
        env.pop("XDG_DATA_HOME", None)
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                *argv], env

    def __call__(self, *args: str, timeout: float = TIMEOUT, input: bytes | None = None
                 ) -> subprocess.CompletedProcess[str]:
        argv, env = self._wrap(self.cmd(*args))
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              input=None if input is None else input.decode(),
                              start_new_session=True, check=False)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        argv, env = self._wrap(self.cmd(*args))
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)

    def ok(self, *args: str, timeout: float = TIMEOUT) -> str:
        p = self(*args, timeout=timeout)
        assert p.returncode == 0, f"mountctl {' '.join(args)} -> {p.returncode}\n{p.stderr}"
        return p.stdout


def make_root(base: Path, rootless: bool) -> Path:
    """A store root; rootless, in a fresh 0755 directory owned by uid 1000 outside the
    (0700) pytest tmp tree."""
    if not rootless:
        return base / "root"
    top = Path(tempfile.mkdtemp(prefix="mctl-rootless-"))
    os.chmod(top, 0o755)
    os.chown(top, ROOTLESS_UID, ROOTLESS_UID)
    return top / "root"


def copy_for(path: Path, dest_dir: Path, rootless: bool) -> Path:
    """A copy of an archive where the mountctl process can read it."""
    dest = dest_dir / path.name
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(path.read_bytes())
    if rootless:
        os.chown(dest_dir, ROOTLESS_UID, ROOTLESS_UID)
        os.chown(dest, ROOTLESS_UID, ROOTLESS_UID)
    return dest


def read_upper(root: Path, container: str) -> Path:
    """The upper directory of the container with this name."""
    import json

    for d in (root / "containers").iterdir():
        rec = json.loads((d / "container.json").read_text())
        if rec.get("name") == container or rec["id"].startswith(container):
            return d / "upper"
    raise AssertionError(f"no container {container}")


def wait_line(p: subprocess.Popen[str], want: str, timeout: float = 30) -> None:
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(p.stdout.fileno(), True)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.monotonic())):
            line = p.stdout.readline()
            if line.strip() == want:
                return
            if not line:
                break
    p.kill()
    raise AssertionError(f"no {want!r} from the container: {p.communicate(timeout=10)}")


def unionfs_servers(root: Path) -> list[int]:
    """The unionfs servers of runs in store ROOT: mountctl's forked children that named
    themselves (comm) unionfs, with mountctl's command line (naming the store)."""
    found = []
    for pid, cmd in cmdlines():
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == b"unionfs" and str(root) in cmd:
            found.append(pid)
    return found


def cmdlines() -> list[tuple[int, str]]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    out.append((int(d), f.read().replace(b"\0", b" ").decode(errors="replace")))
            except OSError:
                continue
    return out
