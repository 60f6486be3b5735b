"""The container's file system tree, built inside its own mount namespace, then pivot_root.

Owns the order of DESIGN.md section 4 (container side): make / rprivate; bind the new root onto
itself; proc (a new instance for the container's pid namespace, or a bind of the host's when
that is refused); /dev as a tmpfs with null, zero, full, random, urandom and tty bound from the
host, a private devpts (newinstance, ptmxmode=0666) with /dev/ptmx -> pts/ptmx, /dev/shm, the
fd/stdin/stdout/stderr links and mqueue when permitted; /sys bound read-only (rbind, then every
mount of that subtree remounted read-only); tmpfs on /tmp and /run; the bind mounts asked for
(hosts, hostname, resolv.conf, volumes); then `pivot_root(".", ".")` and `umount2(".",
MNT_DETACH)`, which leaves only the new tree in the namespace.

Invariants: every mount target inside the new root is opened with openat2(RESOLVE_IN_ROOT)
and mounted through its /proc/self/fd link, so a symlink in the image can never send a mount
outside the container's tree; missing mount points are created inside the tree (they land in
the container's upper directory); sources of bind mounts are host paths chosen by the runner.
Must run in a process that is alone in a fresh mount namespace (and pid namespace, for proc).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

from mountctl import syscalls as sc
from unionfs.tuples import NamedTuple

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
_REFUSED = (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENODEV, errno.ENOSYS)
_O_PATH = os.O_PATH | os.O_CLOEXEC
SYSTEM_MOUNTS = ("proc", "dev", "sys", "tmp", "run")
"""Mount points the runner always uses, relative to the container's root."""


class Bind(NamedTuple):
    """A bind mount of host path `source` on container path `target`. `optional`: skip it
    when the target cannot be made (e.g. a dangling /etc/resolv.conf symlink in the image)."""

    source: str
    target: str
    readonly: bool = False
    optional: bool = False


def _open_in(root_fd: int, path: str, flags: int = _O_PATH) -> int:
    return sc.openat2(root_fd, path.lstrip("/") or ".", flags, resolve=sc.RESOLVE_IN_ROOT)


def ensure(root_fd: int, path: str, is_dir: bool) -> int:
    """An O_PATH fd of `path` inside the tree of `root_fd`, created (directories 0755, file
    0644, parents as needed) when missing. Symlinks are resolved inside the tree."""
    parts = [p for p in path.split("/") if p]
    cur = _open_in(root_fd, ".")
    try:
        for i, comp in enumerate(parts):
            sub = "/".join(parts[: i + 1])
            try:
                nfd = _open_in(root_fd, sub)
            except FileNotFoundError:
                last = i == len(parts) - 1
                try:
                    if last and not is_dir:
                        os.close(os.open(comp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=cur))
                    else:
                        os.mkdir(comp, 0o755, dir_fd=cur)
                except FileExistsError:
                    pass  # a dangling symlink: the open below says so
                nfd = _open_in(root_fd, sub)
            os.close(cur)
            cur = nfd
        return cur
    except BaseException:
        os.close(cur)
        raise


def _is_dir(fd: int) -> bool:
    return stat.S_ISDIR(os.stat(sc.fd_path(fd)).st_mode)


def _mount_at(root_fd: int, path: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None, is_dir: bool = True) -> None:
    fd = ensure(root_fd, path, is_dir)
    try:
        sc.mount(source, sc.fd_path(fd), fstype, flags, data)
    finally:
        os.close(fd)


def _remount_ro(target: str) -> None:
    sc.mount(None, target, None,
             sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY | sc.remount_flags(target))


def _mount_points_under(path: str) -> list[str]:
    """Mount points at or below `path` in this namespace (mountinfo order)."""
    out = []
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split()[4]
            mp = os.fsdecode(_unescape(raw))
            if mp == path or mp.startswith(prefix):
                out.append(mp)
    return out


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def _real_path(root_fd: int, path: str) -> str:
    fd = _open_in(root_fd, path)
    try:
        return os.readlink(sc.fd_path(fd))
    finally:
        os.close(fd)


def mount_proc(root_fd: int) -> None:
    try:
        _mount_at(root_fd, "proc", "proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    except OSError as e:
        if e.errno not in _REFUSED:
            raise
        # e.g. rootless without a usable procfs: the host's, read through our bind
        _mount_at(root_fd, "proc", "/proc", None, sc.MS_BIND | sc.MS_REC)


def mount_dev(root_fd: int) -> None:
    _mount_at(root_fd, "dev", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME,
              "mode=755,size=65536k")
    dev = _open_in(root_fd, "dev")  # now the tmpfs
    try:
        for name in DEVICES:
            host = f"/dev/{name}"
            try:
                if not stat.S_ISCHR(os.stat(host).st_mode):
                    continue
            except OSError:
                continue
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o666, dir_fd=dev))
            fd = sc.openat2(dev, name, _O_PATH, resolve=sc.RESOLVE_BENEATH
                            | sc.RESOLVE_NO_SYMLINKS)
            try:
                sc.mount(host, sc.fd_path(fd), None, sc.MS_BIND)
            finally:
                os.close(fd)
        for name, mode in (("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o1777)):
            os.mkdir(name, mode, dir_fd=dev)
        pts = sc.openat2(dev, "pts", _O_PATH, resolve=sc.RESOLVE_BENEATH)
        try:
            flags = sc.MS_NOSUID | sc.MS_NOEXEC
            try:
                sc.mount("devpts", sc.fd_path(pts), "devpts", flags,
                         "newinstance,ptmxmode=0666,mode=0620,gid=5")
            except OSError as e:
                if e.errno != errno.EINVAL:  # gid 5 is not mapped (single-id user namespace)
                    raise
                sc.mount("devpts", sc.fd_path(pts), "devpts", flags,
                         "newinstance,ptmxmode=0666,mode=0620")
        finally:
            os.close(pts)
        for link, target in DEV_LINKS:
            os.symlink(target, link, dir_fd=dev)
        shm = sc.openat2(dev, "shm", _O_PATH, resolve=sc.RESOLVE_BENEATH)
        try:
            sc.mount("shm", sc.fd_path(shm), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                     "mode=1777,size=65536k")
        finally:
            os.close(shm)
        mq = sc.openat2(dev, "mqueue", _O_PATH, resolve=sc.RESOLVE_BENEATH)
        try:
            sc.mount("mqueue", sc.fd_path(mq), "mqueue",
                     sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            with contextlib.suppress(OSError):
                os.rmdir("mqueue", dir_fd=dev)
        finally:
            os.close(mq)
    finally:
        os.close(dev)


def mount_sys(root_fd: int, rootless: bool) -> None:
    """The host's /sys, read-only. Rootless, whatever cannot be done is left out: sysfs files
    belong to host root, which is not mapped, so the container cannot write them anyway."""
    try:
        _mount_at(root_fd, "sys", "/sys", None, sc.MS_BIND | sc.MS_REC)
    except OSError as e:
        if rootless and e.errno in _REFUSED:
            return
        raise
    for mp in _mount_points_under(_real_path(root_fd, "sys")):
        try:
            _remount_ro(mp)
        except OSError as e:
            if not rootless or e.errno not in _REFUSED:
                raise


def bind(root_fd: int, b: Bind) -> None:
    src_dir = os.path.isdir(b.source)
    try:
        fd = ensure(root_fd, b.target, src_dir)
    except OSError as e:
        if b.optional:
            return
        raise OSError(e.errno, f"cannot create the mount point {b.target}: {e.strerror}") \
            from None
    try:
        if _is_dir(fd) != src_dir:
            if b.optional:
                return
            kind = "a directory" if src_dir else "not a directory"
            raise OSError(errno.ENOTDIR if src_dir else errno.EISDIR,
                          f"volume {b.source}: the source is {kind} but {b.target} in the "
                          "container is not")
        sc.mount(b.source, sc.fd_path(fd), None, sc.MS_BIND | sc.MS_REC)
    finally:
        os.close(fd)
    if b.readonly:
        top = _open_in(root_fd, b.target)
        try:
            _remount_ro(sc.fd_path(top))
        finally:
            os.close(top)


def enter(root: str, binds: Sequence[Bind], *, rootless: bool) -> None:
    """Build the container's tree on `root` (a mounted union) and make it this process's /."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount(root, root, None, sc.MS_BIND | sc.MS_REC)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # the bind, on top
    try:
        mount_proc(root_fd)
        mount_dev(root_fd)
        mount_sys(root_fd, rootless)
        _mount_at(root_fd, "tmp", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777")
        _mount_at(root_fd, "run", "tmpfs", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=755")
        for b in binds:
            bind(root_fd, b)
        os.fchdir(root_fd)
    finally:
        os.close(root_fd)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
