"""Linux system calls the launcher needs and Python 3.11's os module lacks.

Owns thin ctypes wrappers: unshare, setns, mount, umount2, pivot_root, sethostname, prctl
(PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_NAME), openat2 with RESOLVE_IN_ROOT and mknodat
(through os). Invariants: every wrapper raises OSError carrying the kernel's errno (and the path,
when there is one), exactly like the os module, and never returns an error code; paths are
accepted as str or bytes and passed to the kernel as bytes.
"""

from __future__ import annotations

import ctypes
import os

from unionfs import sys_linux as _ul
from unionfs.sys_linux import (  # re-exported: the one openat2 wrapper lives in unionfs
    RESOLVE_BENEATH as RESOLVE_BENEATH,
)
from unionfs.sys_linux import (
    RESOLVE_IN_ROOT as RESOLVE_IN_ROOT,
)
from unionfs.sys_linux import (
    RESOLVE_NO_MAGICLINKS as RESOLVE_NO_MAGICLINKS,
)
from unionfs.sys_linux import (
    RESOLVE_NO_SYMLINKS as RESOLVE_NO_SYMLINKS,
)
from unionfs.sys_linux import (
    RESOLVE_NO_XDEV as RESOLVE_NO_XDEV,
)


def _load_libc() -> ctypes.CDLL:
    try:  # the usual name: no ldconfig run (find_library forks one, ~50 ms)
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library
        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()

_NR = {
    "x86_64": {"pivot_root": 155},
    "aarch64": {"pivot_root": 41},
}.get(os.uname().machine, {"pivot_root": 155})

# unshare / setns / clone flags
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

# umount2 flags
MNT_FORCE = 0x1
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# prctl options
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

# capabilities (linux/capability.h)
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_RAW = 13
CAP_SYS_CHROOT = 18
CAP_AUDIT_WRITE = 29
CAP_SETFCAP = 31


# statvfs f_flag bits that a bind remount must keep (they may be locked in a user namespace)
_ST_TO_MS = ((os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
             (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
             (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _b(p: Path | None) -> bytes | None:
    return None if p is None else os.fsencode(p)


def _check(ret: int, path: Path | None = None) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        if path is None:
            raise OSError(e, os.strerror(e))
        raise OSError(e, os.strerror(e), os.fsdecode(path))


_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def mount(source: Path | None, target: Path, fstype: str | None = None, flags: int = 0,
          data: str | bytes | None = None) -> None:
    """mount(2). `data` is the file system's option string."""
    raw = data.encode() if isinstance(data, str) else data
    _check(_libc.mount(_b(source), _b(target), fstype.encode() if fstype else None,
                       flags, raw), target)


def umount2(target: Path, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype))


def pivot_root(new_root: Path, put_old: Path) -> None:
    _check(_libc.syscall(_NR["pivot_root"], _b(new_root), _b(put_old)), new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    ret = int(_libc.prctl(option, arg2, arg3, arg4, arg5))
    _check(ret)
    return ret


def set_pdeathsig(signum: int) -> None:
    """Ask the kernel to send `signum` to this process when its parent (thread) exits."""
    prctl(PR_SET_PDEATHSIG, signum)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_bounding_caps(keep: frozenset[int]) -> None:
    """Remove every capability but `keep` from the bounding set (needs CAP_SETPCAP): what a
    later exec can ever hold, even as root."""
    for cap in range(last_cap() + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)


def set_name(name: str) -> None:
    """The process name shown by ps (comm, 15 bytes at most)."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _check(int(_libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)))


def openat2(dirfd: int, path: Path, flags: int, mode: int = 0,
            resolve: int = RESOLVE_IN_ROOT) -> int:
    """openat2(2), O_CLOEXEC always added. With RESOLVE_IN_ROOT, `path` (absolute or not) is
    resolved as if `dirfd` were the root directory: symlinks and `..` never leave it."""
    return _ul.openat2(dirfd, os.fsencode(path), flags, mode, resolve)


def remount_flags(path: Path) -> int:
    """The MS_* flags a bind remount of `path` must repeat (statvfs f_flag), so that flags locked
    by a user namespace (nosuid, nodev, noexec, atime) are kept and the remount is permitted."""
    st = os.statvfs(path)
    out = 0
    for st_bit, ms_bit in _ST_TO_MS:
        if st.f_flag & st_bit:
            out |= ms_bit
    return out


def fd_path(fd: int) -> str:
    """The /proc magic link of `fd`: lets path-only calls (mount targets) act on an fd."""
    return f"/proc/self/fd/{fd}"
