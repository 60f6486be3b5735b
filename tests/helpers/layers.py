"""Layer stacks for union-filesystem tests: a data model, a Hypothesis strategy, a materialiser.

A `Stack` is a list of lower layers (top-first, like `lowerdir=`) plus an initial upper layer.
Each `Layer` maps a relative path (`str`, '/'-separated, no leading slash) to an entry: a regular
file, a directory, a symlink, a hard link to another file of the same layer, a fifo or a whiteout.
Every parent directory of an entry is itself an entry of the same layer, so a layer is a tree.

Whiteouts are generated in the encodings kernel overlayfs understands: a character device 0/0
(`Whiteout("chardev")`) and, in lower layers only, the xattr form (`Whiteout("xattr")`: an empty
regular file with `trusted.overlay.whiteout` inside a directory marked `trusted.overlay.opaque=x`,
kernel >= 6.7). Opaque directories carry `trusted.overlay.opaque=y`. `to_oci` rewrites a stack
into the OCI/AUFS encoding (`.wh.NAME`, `.wh..wh..opq`) that only userspace unions understand.

Names come from a small fixed pool (`NAMES_BY_DEPTH`), so different layers collide on the same
paths and `PATH_POOL` covers every path a generated stack can contain. Symlink targets never
point outside the tree they live in (absolute targets are dangling by construction), so tests can
follow them through a mount safely.

`materialise(stack, root)` writes real directories; calling it twice on two roots gives two
identical, independent copies (one per filesystem under test).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from hypothesis import strategies as st

# -- the name pool --------------------------------------------------------------------------------

NAMES_BY_DEPTH: tuple[tuple[str, ...], ...] = (
    ("a", "b", "c", "é x"),
    ("a", "b", "c"),
    ("a", "b"),
)
MAX_DEPTH = len(NAMES_BY_DEPTH)


def _all_paths() -> tuple[str, ...]:
    out: list[str] = []
    level = [""]
    for names in NAMES_BY_DEPTH:
        level = [f"{p}/{n}" if p else n for p in level for n in names]
        out += level
    return tuple(out)


PATH_POOL: tuple[str, ...] = _all_paths()
"""Every path a generated stack may contain (depth 1..MAX_DEPTH), shallow ones first."""

DANGLING_ABSOLUTE = "/nonexistent-unionfs-diff/x"
"""The only absolute symlink target generated: its parent never exists, so following it can never
reach (or, through O_CREAT, create) anything on the host."""

TRUSTED_OPAQUE = "trusted.overlay.opaque"
TRUSTED_WHITEOUT = "trusted.overlay.whiteout"
OCI_WH = ".wh."
OCI_OPQ = ".wh..wh..opq"

# -- the data model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """Deterministic file content: `size` bytes derived from `seed`.

    A sparse blob has data only in its first and last 3000 bytes and a hole in between (written
    with a seek, so the materialised file really is sparse).
    """

    seed: int
    size: int
    sparse: bool = False

    def segments(self) -> list[tuple[int, bytes]]:
        rng = random.Random(self.seed * 1_000_003 + self.size)
        if not self.sparse or self.size <= 6000:
            return [(0, rng.randbytes(self.size))] if self.size else []
        return [(0, rng.randbytes(3000)), (self.size - 3000, rng.randbytes(3000))]

    def data(self) -> bytes:
        buf = bytearray(self.size)
        for off, chunk in self.segments():
            buf[off:off + len(chunk)] = chunk
        return bytes(buf)

    def sha256(self) -> str:
        return hashlib.sha256(self.data()).hexdigest()


@dataclass(frozen=True)
class File:
    blob: Blob = Blob(0, 0)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    opaque: bool = False


@dataclass(frozen=True)
class Symlink:
    target: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class HardLink:
    """Another name for the `File` at `target` (a path of the same layer)."""

    target: str


@dataclass(frozen=True)
class Fifo:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Whiteout:
    """`form` is "chardev" (0/0 device) or "xattr" (kernel >= 6.7, lower layers only)."""

    form: str = "chardev"


Entry = File | Dir | Symlink | HardLink | Fifo | Whiteout


@dataclass(frozen=True)
class Layer:
    entries: dict[str, Entry] = field(default_factory=dict)

    def sorted_paths(self) -> list[str]:
        return sorted(self.entries, key=lambda p: (p.count("/"), p))


@dataclass(frozen=True)
class Stack:
    lowers: list[Layer]
    upper: Layer = field(default_factory=Layer)

    def all_paths(self) -> set[str]:
        out: set[str] = set()
        for layer in [*self.lowers, self.upper]:
            out |= set(layer.entries)
        return out


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def depth_of(path: str) -> int:
    return path.count("/") + 1 if path else 0


# -- strategies -----------------------------------------------------------------------------------

SIZES = (0, 1, 17, 4096, 4097, 65536, 65537, 150_000)
SPARSE_SIZES = (300_000, 1_048_576)
FILE_MODES = (0o644, 0o600, 0o755, 0o444, 0o4755, 0o2750, 0o000)
DIR_MODES = (0o755, 0o700, 0o555, 0o1777, 0o2775)
IDS = (0, 1000)
XATTR_NAMES = ("user.a", "user.b", "user.long.name")
XATTR_VALUES = (b"", b"1", b"value", b"\x00\xff binary", b"v" * 300)


def blobs() -> st.SearchStrategy[Blob]:
    seeds = st.integers(0, 255)
    return st.one_of(
        st.builds(Blob, seeds, st.sampled_from(SIZES)),
        st.builds(Blob, seeds, st.sampled_from(SPARSE_SIZES), st.just(True)),
    )


def xattr_sets() -> st.SearchStrategy[tuple[tuple[str, bytes], ...]]:
    return st.dictionaries(st.sampled_from(XATTR_NAMES), st.sampled_from(XATTR_VALUES),
                           max_size=2).map(lambda d: tuple(sorted(d.items())))


def symlink_targets(link_path: str) -> st.SearchStrategy[str]:
    """Targets that stay inside the tree: relative paths climbing at most to the tree's root,
    dangling relative names, and the one dangling absolute target."""
    up = depth_of(link_path) - 1
    inside = st.builds(lambda k, p: "../" * k + p, st.integers(0, up),
                       st.sampled_from(PATH_POOL[:16]))
    return st.one_of(inside, st.sampled_from(("zz", "../zz" if up else "zz/y", DANGLING_ABSOLUTE,
                                              ".", "a/")))


def _files() -> st.SearchStrategy[File]:
    return st.builds(File, blobs(), st.sampled_from(FILE_MODES), st.sampled_from(IDS),
                     st.sampled_from(IDS), xattr_sets())


@st.composite
def _dir_tree(draw: st.DrawFn, prefix: str, depth: int, lower: bool, xwhiteouts: bool,
              opaque_parent: bool) -> dict[str, Entry]:
    """Entries below the directory `prefix` (which is at `depth`)."""
    out: dict[str, Entry] = {}
    if depth >= MAX_DEPTH:
        return out
    names = draw(st.lists(st.sampled_from(NAMES_BY_DEPTH[depth]), unique=True,
                          min_size=1 if depth == 0 else 0,
                          max_size=len(NAMES_BY_DEPTH[depth])))
    for name in names:
        path = f"{prefix}/{name}" if prefix else name
        kinds = ["file", "file", "file", "dir", "dir", "dir", "symlink", "fifo", "whiteout",
                 "whiteout"]
        if depth == MAX_DEPTH - 1:
            kinds = [k for k in kinds if k != "dir"]
        kind = draw(st.sampled_from(kinds))
        if kind == "file":
            out[path] = draw(_files())
        elif kind == "dir":
            d = draw(st.builds(Dir, st.sampled_from(DIR_MODES), st.sampled_from(IDS),
                               st.sampled_from(IDS), xattr_sets(), st.booleans()))
            out[path] = d
            out.update(draw(_dir_tree(path, depth + 1, lower, xwhiteouts, d.opaque)))
        elif kind == "symlink":
            out[path] = Symlink(draw(symlink_targets(path)), draw(st.sampled_from(IDS)),
                                draw(st.sampled_from(IDS)))
        elif kind == "fifo":
            out[path] = draw(st.builds(Fifo, st.sampled_from((0o644, 0o600)),
                                       st.sampled_from(IDS), st.sampled_from(IDS)))
        else:
            forms = ["chardev"]
            if lower and xwhiteouts and not opaque_parent:
                forms.append("xattr")
            out[path] = Whiteout(draw(st.sampled_from(forms)))
    return out


@st.composite
def layers(draw: st.DrawFn, lower: bool = True, xwhiteouts: bool = True) -> Layer:
    entries = draw(_dir_tree("", 0, lower, xwhiteouts, False))
    files = [p for p, e in entries.items() if isinstance(e, File)]
    if len(files) >= 2:
        pairs = draw(st.lists(st.tuples(st.sampled_from(files), st.sampled_from(files)),
                              max_size=4))
        for src, dst in pairs:
            linked_to_dst = any(isinstance(e, HardLink) and e.target == dst
                                for e in entries.values())
            if (src != dst and isinstance(entries[src], File) and isinstance(entries[dst], File)
                    and not linked_to_dst):
                entries[dst] = HardLink(src)
    return Layer(entries)


@st.composite
def stacks(draw: st.DrawFn, min_lowers: int = 1, max_lowers: int = 4,
           xwhiteouts: bool = True, upper: bool = True) -> Stack:
    """1-4 lower layers (top-first) and an initial upper layer (chardev whiteouts only)."""
    n = draw(st.integers(min_lowers, max_lowers))
    lowers = [draw(layers(lower=True, xwhiteouts=xwhiteouts)) for _ in range(n)]
    up = draw(layers(lower=False, xwhiteouts=False)) if upper else Layer()
    return Stack(lowers, up)


# -- materialising --------------------------------------------------------------------------------


def _xwhiteout_dirs(layer: Layer) -> set[str]:
    """Directories (""=layer root) that need `opaque=x` because they hold xattr whiteouts."""
    return {parent_of(p) for p, e in layer.entries.items()
            if isinstance(e, Whiteout) and e.form == "xattr"}


def materialise_layer(layer: Layer, root: Path) -> None:
    """Write `layer` into the (new or empty) directory `root`."""
    root.mkdir(parents=True, exist_ok=True)
    dirs_meta: list[tuple[Path, Dir]] = []
    for rel in layer.sorted_paths():
        e = layer.entries[rel]
        p = root / rel
        if isinstance(e, Dir):
            p.mkdir()
            dirs_meta.append((p, e))
        elif isinstance(e, File):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for off, chunk in e.blob.segments():
                    os.pwrite(fd, chunk, off)
                os.ftruncate(fd, e.blob.size)
            finally:
                os.close(fd)
            for k, v in e.xattrs:
                os.setxattr(p, k, v)
            os.chown(p, e.uid, e.gid)
            os.chmod(p, e.mode)  # after chown: chown clears set-id bits
        elif isinstance(e, HardLink):
            pass  # below, once every target exists
        elif isinstance(e, Symlink):
            os.symlink(e.target, p)
            os.lchown(p, e.uid, e.gid)
        elif isinstance(e, Fifo):
            os.mkfifo(p, 0o600)
            os.chown(p, e.uid, e.gid)
            os.chmod(p, e.mode)
        elif e.form == "chardev":
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        else:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.setxattr(p, TRUSTED_WHITEOUT, b"")
    for rel, e in layer.entries.items():
        if isinstance(e, HardLink):
            os.link(root / e.target, root / rel)
    xdirs = _xwhiteout_dirs(layer)
    if "" in xdirs:
        os.setxattr(root, TRUSTED_OPAQUE, b"x")
    for p, d in reversed(dirs_meta):  # deepest first
        for k, v in d.xattrs:
            os.setxattr(p, k, v)
        if d.opaque:
            os.setxattr(p, TRUSTED_OPAQUE, b"y")
        elif str(p.relative_to(root)) in xdirs:
            os.setxattr(p, TRUSTED_OPAQUE, b"x")
        os.chown(p, d.uid, d.gid)
        os.chmod(p, d.mode)


@dataclass
class StackDirs:
    """Where a materialised stack lives. `lowers` is top-first, like `lowerdir=`."""

    root: Path
    lowers: list[Path]
    upper: Path
    work: Path


def materialise(stack: Stack, root: Path) -> StackDirs:
    """Write `stack` below `root` as `lower0..N` (lower0 on top), `upper` and an empty `work`."""
    root.mkdir(parents=True, exist_ok=True)
    lowers = []
    for i, layer in enumerate(stack.lowers):
        d = root / f"lower{i}"
        materialise_layer(layer, d)
        lowers.append(d)
    upper = root / "upper"
    materialise_layer(stack.upper, upper)
    work = root / "work"
    work.mkdir()
    return StackDirs(root, lowers, upper, work)


# -- the OCI / AUFS encoding ----------------------------------------------------------------------


def to_oci_layer(layer: Layer) -> Layer:
    """Same meaning, OCI encoding: whiteouts become empty `.wh.NAME` files, opaque directories
    lose the xattr and get an empty `.wh..wh..opq` entry, `opaque=x` markers disappear."""
    out: dict[str, Entry] = {}
    for rel, e in layer.entries.items():
        if isinstance(e, Whiteout):
            parent, _, name = rel.rpartition("/")
            wh = f"{parent}/{OCI_WH}{name}" if parent else f"{OCI_WH}{name}"
            out[wh] = File(Blob(0, 0), 0o644)
        elif isinstance(e, Dir) and e.opaque:
            out[rel] = replace(e, opaque=False)
            out[f"{rel}/{OCI_OPQ}"] = File(Blob(0, 0), 0o644)
        else:
            out[rel] = e
    return Layer(out)


def to_oci(stack: Stack) -> Stack:
    return Stack([to_oci_layer(layer) for layer in stack.lowers], to_oci_layer(stack.upper))


# -- kernel capability probes ---------------------------------------------------------------------


@contextlib.contextmanager
def _tempdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="unionfs-probe-"))
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d / "m")], capture_output=True, check=False,
                       timeout=30)
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False, timeout=60)


@functools.cache
def kernel_honours_xattr_whiteouts() -> bool:
    """Does this kernel's overlayfs treat `trusted.overlay.whiteout` files inside an `opaque=x`
    directory as whiteouts (Linux >= 6.7)? Probed with a real mount, once per process."""
    try:
        with _tempdir() as d:
            hi, lo, m = d / "hi", d / "lo", d / "m"
            for x in (hi / "dir", lo / "dir", m):
                x.mkdir(parents=True)
            (lo / "dir" / "gone").write_bytes(b"x")
            (lo / "dir" / "kept").write_bytes(b"x")
            (hi / "dir" / "gone").write_bytes(b"")
            os.setxattr(hi / "dir" / "gone", TRUSTED_WHITEOUT, b"")
            os.setxattr(hi / "dir", TRUSTED_OPAQUE, b"x")
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"lowerdir={hi}:{lo}", str(m)], capture_output=True,
                               timeout=30, check=False)
            if r.returncode != 0:
                return False
            try:
                return sorted(os.listdir(m / "dir")) == ["kept"]
            finally:
                subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30,
                               check=False)
    except OSError:
        return False


def wide_layers(root: Path, nlayers: int, ndirs: int) -> list[Path]:
    """NLAYERS layers (top-first, root/l0 ...) that all hold d00 ... and dNN/sub/, layer I a
    file fI in each dNN: many directories, each merging every layer."""
    lowers = [root / f"l{i}" for i in range(nlayers)]
    for i, p in enumerate(lowers):
        for d in range(ndirs):
            (p / f"d{d:02d}" / "sub").mkdir(parents=True)
            (p / f"d{d:02d}" / f"f{i}").touch()
    return lowers
