"""The frozen configuration of one mount, built by `cli` and read everywhere else.

(A named tuple, not a dataclass: every mount starts a Python process, and the dataclasses
module and the classes it generates cost about 14 ms of the server's start-up.)"""

from __future__ import annotations

from .tuples import NamedTuple


class Config(NamedTuple):
    lowers: tuple[str, ...]
    mountpoint: str
    upper: str | None = None
    work: str | None = None
    foreground: bool = False
    debug: bool = False
    fsname: str = "unionfs"
    allow_other: bool = False
    default_permissions: bool = True
    timeout: float = 86400.0
    writeback: bool = True
    readahead_kib: int = 1024  # the mount's read-ahead window (0: the kernel's default, 128)
    dircache: bool = True  # stateless readdir with kernel-cached listings, when pyfuse3 can
    noopen: bool = False  # per-inode I/O without open/release requests (opt-in, see cli help)
    squash_to_root: bool = False
    loop: str = "direct"  # "direct" (pyfuse3.main_blocking, patched pyfuse3) or "trio"
    spin_us: int = 50  # direct loop: poll this long for the next request before sleeping
    lowerindex: str | None = None  # a `layerindex` file describing the lower branches
    lowerindex_check: str = "dirs"  # how it is checked against them at mount (see layerindex)
    lowercache: str | None = None  # directory of `lowercache` files (None: nothing kept)
    lowercache_check: str = "ahead"  # its records checked by a helper at mount, or "inline"
    fuse_options: tuple[str, ...] = ()

    @property
    def writable(self) -> bool:
        return self.upper is not None
