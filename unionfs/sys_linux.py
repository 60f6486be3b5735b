"""Linux system calls that the os module lacks: openat2, renameat2, FICLONE, fallocate, file
handles (name_to_handle_at, open_by_handle_at), prctl(PR_SET_PDEATHSIG, PR_SET_NAME), helpers.

Each wrapper raises OSError with the kernel's errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

# the C library this process already has loaded (ctypes.util.find_library would run ldconfig
# or search the library path: milliseconds of every start-up)
_libc = ctypes.CDLL(None, use_errno=True)

_NR = {
    "x86_64": {"openat2": 437, "renameat2": 316},
    "aarch64": {"openat2": 437, "renameat2": 276},
}.get(os.uname().machine, {"openat2": 437, "renameat2": 316})

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

FICLONE = 0x40049409


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _raise(path: bytes | None = None) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), path)


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0,
            resolve: int = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) -> int:
    """openat2(2): open PATH below DIRFD without following any symlink or leaving the tree."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _syscall(_NR["openat2"], ctypes.c_int(dirfd), ctypes.c_char_p(path),
                  ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        _raise(path)
    return int(fd)


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes,
              flags: int = 0) -> None:
    r = _syscall(_NR["renameat2"], ctypes.c_int(olddirfd), ctypes.c_char_p(oldname),
                 ctypes.c_int(newdirfd), ctypes.c_char_p(newname), ctypes.c_uint(flags))
    if r < 0:
        _raise(oldname)


def ficlone(dst_fd: int, src_fd: int) -> None:
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


FALLOC_FL_KEEP_SIZE = 1


def fallocate(fd: int, offset: int, length: int) -> None:
    """fallocate(2) with FALLOC_FL_KEEP_SIZE: reserve the blocks of [OFFSET, OFFSET+LENGTH) at
    once, leaving the file's size as it is. Unlike posix_fallocate, never falls back to writing
    zeros: EOPNOTSUPP where unsupported."""
    if _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) < 0:
        _raise()


PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): SIG is sent to this process when the thread that forked it
    ends."""
    if _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        _raise()


PR_SET_NAME = 15


def set_name(name: bytes) -> None:
    """prctl(PR_SET_NAME): this thread's name (comm, what ps and top show; 15 bytes at most)."""
    if _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0) != 0:
        _raise()


def fd_path(fd: int) -> str:
    """The /proc magic link of FD: lets path-only calls (xattrs, chmod) act on an O_PATH fd."""
    return f"/proc/self/fd/{fd}"


def malloc_trim() -> None:
    """Hand free heap memory back to the system (glibc); a no-op elsewhere."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128
_HANDLE_HEAD = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type

_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                               ctypes.POINTER(ctypes.c_int), ctypes.c_int)
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int)


def name_to_handle_at(dirfd: int, name: bytes, flags: int = 0) -> tuple[bytes, int]:
    """name_to_handle_at(2): the file handle of NAME in DIRFD (a symlink itself, never what it
    points to; with AT_EMPTY_PATH and NAME b"", DIRFD's own) as the bytes of a struct
    file_handle, and the id of the mount it was found on."""
    buf = ctypes.create_string_buffer(_HANDLE_HEAD.size + MAX_HANDLE_SZ)
    _HANDLE_HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _name_to_handle_at(dirfd, name, buf, ctypes.byref(mount_id), flags) < 0:
        _raise(name)
    size = _HANDLE_HEAD.unpack_from(buf, 0)[0]
    return buf.raw[:_HANDLE_HEAD.size + size], mount_id.value


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2): open the object HANDLE (from `name_to_handle_at`) names on the
    file system of MOUNT_FD (not an O_PATH fd). Needs CAP_DAC_READ_SEARCH; ESTALE once the
    object is gone."""
    fd = _open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC)
    if fd < 0:
        _raise()
    return int(fd)
