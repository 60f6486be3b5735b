"""`mountctl check`: what this host allows, probed for real, and which mode `run` will use.

Owns the probes (each runs in a forked child, so nothing about the caller changes, and leaves
no file or mount behind) and their explanation in plain words. The verdict follows the same
rules as run.py: root -> rootful, else a user namespace; `--driver auto` takes kernel overlayfs
when a test mount works where the container's root would be mounted, else unionfs, which needs
read-write access to /dev/fuse.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable

from mountctl import idmap
from mountctl import syscalls as sc
from unionfs.tuples import NamedTuple


class Fact(NamedTuple):
    topic: str
    ok: bool
    text: str


class Report(NamedTuple):
    facts: tuple[Fact, ...]
    mode: str
    can_run: bool

    def lines(self) -> list[str]:
        width = max(len(f.topic) for f in self.facts) + 1
        out = [f"{'ok ' if f.ok else 'no '} {(f.topic + ':').ljust(width)} {f.text}"
               for f in self.facts]
        out.append("")
        out.append(f"run will use: {self.mode}")
        return out


def _in_child(fn: Callable[[], None]) -> str:
    """Run `fn` in a forked child; '' on success, else the error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - forked child
        code = 0
        try:
            os.close(r)
            fn()
        except BaseException as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            with contextlib.suppress(OSError):
                os.write(w, (msg or type(e).__name__).encode()[:2000])
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    msg = b"".join(chunks).decode(errors="replace")
    if not msg and status != 0:
        msg = f"probe failed (status {status})"
    return msg


def probe_userns() -> str:
    def attempt() -> None:
        idmap.enter_userns(idmap.single(os.geteuid(), os.getegid()), sc.CLONE_NEWNS)

    return _in_child(attempt)


def probe_overlay(rootless: bool, base: str | None = None) -> str:
    """Mount kernel overlayfs over scratch directories (in a user namespace when rootless)."""
    import tempfile  # (start-up time: not every command needs it)
    tmp = tempfile.mkdtemp(prefix="mountctl-check-", dir=base)

    def attempt() -> None:
        if rootless:
            idmap.enter_userns(idmap.single(os.geteuid(), os.getegid()), sc.CLONE_NEWNS)
        else:
            sc.unshare(sc.CLONE_NEWNS)
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
        for d in ("l", "u", "w", "m"):
            os.mkdir(os.path.join(tmp, d))
        data = f"lowerdir={tmp}/l,upperdir={tmp}/u,workdir={tmp}/w"
        sc.mount("overlay", f"{tmp}/m", "overlay", 0, data + (",userxattr" if rootless else ""))
        sc.umount2(f"{tmp}/m", sc.MNT_DETACH)

    try:
        return _in_child(attempt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fuse_fact() -> tuple[Fact, bool]:
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        return Fact("/dev/fuse", False, "missing (no FUSE in this kernel or container): "
                    "unionfs cannot run"), False
    if not stat.S_ISCHR(st.st_mode):
        return Fact("/dev/fuse", False, "is not a character device"), False
    mode = stat.S_IMODE(st.st_mode)
    if os.access("/dev/fuse", os.R_OK | os.W_OK):
        return Fact("/dev/fuse", True, f"readable and writable by you (mode {mode:04o}): "
                    "unionfs can mount"), True
    return Fact("/dev/fuse", False,
                f"mode {mode:04o}, not accessible to you: unionfs cannot mount (most "
                "distributions make it 0666; ask an administrator)"), False


def report(store_root: str | None = None) -> Report:
    facts: list[Fact] = []
    rootless = os.geteuid() != 0
    uid = os.getuid()
    name = idmap.user_name(uid)
    facts.append(Fact("user", True, f"uid {uid} ({name})" + (
        ": not root, containers run rootless in a user namespace" if rootless
        else ": root, containers run rootful")))

    userns_err = probe_userns()
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            limit = f.read().strip()
    except OSError:
        limit = "?"
    facts.append(Fact("user namespaces", not userns_err,
                      f"allowed (up to {limit})" if not userns_err
                      else f"refused ({userns_err})"))

    fuse_fact, fuse_ok = _fuse_fact()
    facts.append(fuse_fact)

    fm = shutil.which("fusermount3")
    if fm is None:
        facts.append(Fact("fusermount3", False, "not installed (only needed to mount FUSE as a "
                          "normal user outside a user namespace; mountctl does not use it)"))
    else:
        suid = bool(os.stat(fm).st_mode & stat.S_ISUID)
        facts.append(Fact("fusermount3", suid, f"{fm}" + (", set-uid root" if suid else
                                                           ", not set-uid: cannot help")))

    have_ovl = False
    try:
        with open("/proc/filesystems") as f:
            have_ovl = any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        pass
    base = store_root if store_root and os.path.isdir(store_root) else None
    ovl_err = probe_overlay(rootless, base) if (have_ovl or not rootless) else "not available"
    where = "in a user namespace" if rootless else "as root"
    facts.append(Fact("kernel overlayfs", not ovl_err,
                      f"a test mount {where} works" if not ovl_err
                      else f"a test mount {where} failed ({ovl_err})"))

    plan = idmap.host_plan()
    if rootless:
        subs = idmap.read_subids("/etc/subuid", uid)
        helpers = idmap.helpers_present()
        if plan.method == "newuidmap":
            r = plan.uids[1]
            facts.append(Fact("subordinate ids", True,
                              f"{r.count} ids from {r.outside} in /etc/subuid and /etc/subgid, "
                              "applied with newuidmap/newgidmap"))
        else:
            why = ("newuidmap/newgidmap are not installed (package uidmap)" if subs
                   and not helpers else f"no range for {name} in /etc/subuid or /etc/subgid")
            facts.append(Fact("subordinate ids", False,
                              f"{why}: single-id mapping, only root (you) exists inside"))

    if rootless and userns_err:
        mode = "nothing: this user cannot create user namespaces, so rootless runs fail"
        return Report(tuple(facts), mode, False)
    if not ovl_err:
        driver = "kernel overlayfs for --driver auto and overlay"
        if fuse_ok:
            driver += "; unionfs for --driver fuse"
    elif fuse_ok:
        driver = "unionfs (FUSE) for --driver auto and fuse; --driver overlay would fail"
    else:
        return Report(tuple(facts), "nothing: neither kernel overlayfs nor /dev/fuse is usable",
                      False)
    if rootless:
        ids = ("subordinate ids" if plan.method == "newuidmap"
               else "a single-id mapping (images that need other users: -u 0)")
        mode = (f"rootless mode: user namespace with {ids}, plus mount, pid, uts and ipc "
                f"namespaces; {driver}")
    else:
        mode = f"rootful mode: mount, pid, uts and ipc namespaces; {driver}"
    return Report(tuple(facts), mode, True)
