"""The lower index: what the read-only layers of a stack hold, learnt once and kept in a file.

Lower branches are immutable, so what a lookup learns about them can outlive the mount. This
module owns that knowledge: `build` walks an ordered lower stack once (as mountctl's image import
would) and writes, for every directory of the merged lower view, which layers it merges and, for
every name any of those layers holds there, what each layer holds under it (whiteouts in every
encoding, opaque directories and redirects already classified, by the same `Branch` code the
server probes with). `load` reads such a file back for a mount and refuses it (`LowerIndexError`,
a RuntimeError: the mount fails with its message) when it was built for other layers or when a
layer changed since.

At run time the index answers, without a system call:

- `Union._resolve`: the lower part of a lookup in a directory whose lower layers are exactly an
  indexed directory (`LowerIndex.entries`): one dict lookup whatever the number of layers; the
  upper branch is still probed, and a name the index says no layer holds costs no lower syscall;
- `Branch.listing` / `Branch.dir_info` of a lower branch (`LowerIndex.view`): the classified
  listing and opaque/redirect flags of every indexed directory of that layer;
- `Branch.stat` of a lower branch (`LowerIndex.stat`), only when the check vouches for
  attributes (`files` or `roots`, see below): the lstat of every indexed directory and
  non-directory as recorded at build, so a lookup or getattr of a lower object touches no layer.
  Opening, reading, readlink, xattrs and copy-up still read the layer (copy-up stats afresh).

Anything the index does not cover (a directory reached through a redirect, one hidden in the
merged lower view) is probed as without an index, so the index can make a lookup faster, never
different.

Invariants:
- a directory record is keyed by its layers, (branch, path in that branch) top-first, and holds
  only what those branch directories hold, so whatever path led to a node with those layers, the
  record describes it;
- per name, the record lists every layer entry that is not a plain "missing" (directory,
  non-directory, whiteout, or a name a `.wh.NAME` beside it hides below), top-first; `resolve`
  ignores the missing ones, so folding the record's entries gives the probed answer;
- staleness: each layer's root (st_dev, st_ino) must match (a layer now on another device is
  refused, never remapped: st_dev is part of every recorded attribute and of the union's inode
  numbers); then, by `check`:
  - `dirs` (the default): the st_ino, mtime and ctime of every indexed directory of every layer
    (adding, removing or renaming an entry changes its directory's mtime, a changed xattr its
    ctime). An in-place change of a file changes no directory, so this cannot vouch for
    attributes: they are not served, every lower object is stat'ed live;
  - `files`: `dirs`, plus every indexed object's lstat compared with the recorded one, all
    fields but the access time (an in-place write, chmod, chown, new hard link, touch changes
    the ctime at least): one fstatat per object at mount. Attributes are served;
  - `roots`: only the roots (stores whose layers are immutable by construction, as mountctl's).
    Attributes are served: the layers are trusted.
  Never checked: file contents (read live anyway), the xattr whiteout flag of a file inside an
  `opaque=x` directory, and access times: served attributes show the access time at build
  (reading a file or symlink may move the layer's own; composefs behaves the same way).

File format: `marshal` of plain tuples, dicts and bytes (loads at several hundred thousand
names per second); see `_encode`.
"""

from __future__ import annotations

import marshal
import os
import stat
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from .atomicfile import write_atomically
from .branch import Branch, join, split
from .core.readdir import Listing
from .core.resolve import BranchEntry, Kind, Resolution, resolve
from .lowercache import seal, unseal
from .statpack import pack as _pack
from .statpack import unpack as _stat_result

AUTO = "auto"
"""`lowerindex=auto`: the index kept in the lower cache directory (see `lowercache`)."""
MAGIC = b"unionfs-lowerindex"
VERSION = 4
CHECKS = ("dirs", "files", "roots")
ATTR_CHECKS = ("files", "roots")
"""The checks under which the index's attributes are served (`LowerIndex.stat`): `files`
compares them with every indexed object at mount, `roots` trusts immutable layers."""
SEEN_MAX = 1 << 12

# one entry code: Kind value in the low two bits, then flags
_OPAQUE = 4
_HIDES = 8
_REDIRECT = 16

Layers = tuple[tuple[int, bytes], ...]
"""(branch number, path in that branch) of each layer of a merged directory, top-first."""


class LowerIndexError(RuntimeError):
    """The index file cannot be used for these layers (the message says why)."""


def _code(e: BranchEntry) -> int:
    c = e.kind.value
    if e.opaque:
        c |= _OPAQUE
    if e.hides_below:
        c |= _HIDES
    if e.redirect is not None:
        c |= _REDIRECT
    return c


_KINDS = {k.value: k for k in Kind}
# the entry each code stands for (redirect values are looked up separately)
_ENTRIES = tuple(BranchEntry(_KINDS[c & 3], bool(c & _OPAQUE), bool(c & _HIDES))
                 for c in range(32))
_LISTED = {Kind.DIR: BranchEntry(Kind.DIR), Kind.OTHER: BranchEntry(Kind.OTHER),
           Kind.WHITEOUT: BranchEntry(Kind.WHITEOUT)}


def _identity(path: str, st: os.stat_result) -> tuple[str, int, int, int, int]:
    return (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


_STATABLE = (Kind.DIR.value, Kind.OTHER.value)  # the entry kinds that carry attributes


def _comparable(st: os.stat_result) -> tuple[int, ...]:
    """What the `files` check compares: everything but the access time (see the module
    docstring)."""
    return (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_ino, st.st_dev, st.st_size,
            st.st_rdev, st.st_blocks, st.st_blksize, st.st_mtime_ns, st.st_ctime_ns)


# --- building ------------------------------------------------------------------------------

def build(lowers: Sequence[str]) -> bytes:
    """The index of the lower stack LOWERS (top-first, as `lowerdir=`), as file content."""
    paths = [os.path.realpath(p) for p in lowers]
    branches = [Branch(i, p, writable=False) for i, p in enumerate(paths)]
    try:
        return seal(_encode(paths, branches))
    finally:
        for b in branches:
            b.close()


def write(lowers: Sequence[str], dest: str, mode: int = 0o644) -> None:
    """Build the index of LOWERS into DEST (atomically: a temporary file renamed into place),
    at most MODE (whatever the umask: a FUSE server runs with none)."""
    write_atomically(dest, build(lowers), mode)


def _encode(paths: Sequence[str], branches: Sequence[Branch]) -> bytes:
    """Walk the merged lower view breadth-first from the root.

    File content: marshal of (MAGIC, VERSION, identities, roots, records, redirects, dirstats),
    then its CRC-32 (`lowercache.seal`: a damaged file is refused at load, not at a lookup):
    - identities: per layer (realpath, st_dev, st_ino, mtime_ns, ctime_ns) of its root;
    - roots: per layer (opaque, redirect or None) of its root directory;
    - records: (layers, names, attrs) per merged directory; layers as `Layers` with lower
      positions (0 = top lower); names: the marshal of name -> (pos, code, pos, code, ...) of
      the non-missing entries, unmarshalled on first use (decoding every directory's names at
      mount took 37 ms for a layer of 100,000 files, at each mount and in mountctl's check
      before it); attrs: zlib of the `_ATTR` lstat of every directory and non-directory entry
      (not whiteouts), in the order of names and then of their entries (decoded on first use);
    - redirects: (pos, path) -> overlay.redirect value of every indexed directory that has one;
    - dirstats: (pos, path, st_ino, mtime_ns, ctime_ns) of every indexed layer directory.
    """
    idents = []
    roots = []
    for p, b in zip(paths, branches, strict=True):
        idents.append(_identity(p, os.fstat(b.fd)))
        info = b.dir_info(b"")
        roots.append((info.opaque, info.redirect))
    root_entries = [(b.index, BranchEntry(Kind.DIR, opaque=o)) for b, (o, _) in
                    zip(branches, roots, strict=True)]
    root_layers: Layers = tuple((i, b"") for i in resolve(root_entries).branches)
    records: list[tuple[Layers, dict[bytes, tuple[int, ...]], list[bytes]]] = []
    # (pos, path) -> (record, slot) of each of its attributes, filled after the walk
    dir_slots: dict[tuple[int, bytes], list[tuple[int, int]]] = {}
    redirects: dict[tuple[int, bytes], bytes] = {}
    dirstats: dict[tuple[int, bytes], tuple[int, int, int]] = {}
    seen: set[Layers] = {root_layers}
    todo: deque[Layers] = deque([root_layers])
    while todo:
        layers = todo.popleft()
        for pos, rel in layers:
            if (pos, rel) not in dirstats:
                st = branches[pos].stat(rel)
                dirstats[(pos, rel)] = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        found: dict[bytes, list[tuple[int, BranchEntry]]] = {}
        attrs: dict[tuple[int, bytes], bytes] = {}
        for pos, rel in layers:
            b = branches[pos]
            lst = b.listing(rel)
            fd = b.open_dir(rel)
            try:
                for name in (*lst.entries, *(lst.hidden - lst.entries.keys())):
                    e = b.entry(rel, name)
                    found.setdefault(name, []).append((pos, e))
                    if e.redirect is not None:
                        redirects[(pos, join(rel, name))] = e.redirect
                    if e.kind is Kind.OTHER:
                        attrs[(pos, name)] = _pack(os.stat(name, dir_fd=fd,
                                                           follow_symlinks=False))
                    elif e.kind is Kind.DIR:  # stat'ed after the walk, which reads it
                        attrs[(pos, name)] = b""
            finally:
                os.close(fd)
        rels = dict(layers)
        names: dict[bytes, tuple[int, ...]] = {}
        packed: list[bytes] = []
        for name, entries in found.items():
            names[name] = tuple(x for pos, e in entries for x in (pos, _code(e)))
            for pos, e in entries:
                if e.kind.value in _STATABLE:
                    if e.kind is Kind.DIR:
                        dir_slots.setdefault((pos, join(rels[pos], name)), []).append(
                            (len(records), len(packed)))
                    packed.append(attrs[(pos, name)])
            res = resolve(entries)
            if res.kind is not Kind.DIR:
                continue
            if any(e.kind is Kind.DIR and e.redirect is not None and not e.opaque
                   for _, e in entries):
                continue  # a moved directory: probed at run time, not indexed
            child: Layers = tuple((p, join(rels[p], name)) for p in res.branches)
            if child not in seen:
                seen.add(child)
                todo.append(child)
        records.append((layers, names, packed))
    # directories are stat'ed once the walk has read them all (reading a directory may move
    # its access time)
    for (pos, path), slots in dir_slots.items():
        attr = _pack(branches[pos].lstat(path))
        for r, i in slots:
            records[r][2][i] = attr
    stats = tuple((pos, rel, *v) for (pos, rel), v in dirstats.items())
    out = [(layers, marshal.dumps(names), zlib.compress(b"".join(packed), 1))
           for layers, names, packed in records]
    return marshal.dumps((MAGIC, VERSION, tuple(idents), tuple(roots), out, redirects,
                          stats))


# --- using -----------------------------------------------------------------------------------

class _Record:
    __slots__ = ("_names", "attrs", "layers", "listings", "packed_names", "raw", "rels", "slots")

    def __init__(self, layers: Layers, packed_names: bytes,
                 rels: dict[int, bytes], attrs: bytes) -> None:
        self.layers = layers  # branch numbers of this mount
        self.packed_names = packed_names  # marshal of `names`, as in the file
        self._names: dict[bytes, tuple[int, ...]] | None = None
        self.rels = rels  # branch number -> path there
        self.attrs = attrs  # packed lstat of every DIR/OTHER entry (zlib), see `_encode`
        # per branch number, made on first use
        self.listings: dict[int, Listing] | None = None
        self.raw: bytes | None = None  # attrs decompressed, on first use
        # name -> slot of its first attributes in raw
        self.slots: dict[bytes, int] | None = None

    @property
    def names(self) -> dict[bytes, tuple[int, ...]]:
        """name -> (lower position, entry code, ...) of the non-missing entries, unpacked on
        first use."""
        names = self._names
        if names is None:  # (the file's checksum was verified at load)
            names = self._names = marshal.loads(self.packed_names)
        return names


class LowerIndex:
    """A loaded index bound to the branch numbers of one mount (`first`: the branch number of
    the top lower layer, 1 when there is an upper branch)."""

    def __init__(self, first: int, roots: Sequence[tuple[bool, bytes | None]],
                 records: Sequence[tuple[Layers, bytes, bytes]],
                 redirects: dict[tuple[int, bytes], bytes], attrs: bool = False) -> None:
        self.first = first
        # whether `stat` answers from the index (the check vouches for attributes)
        self.attrs = attrs
        self.roots = roots
        self.redirects = redirects
        self.records: dict[Layers, _Record] = {}
        # id(node.lowers) -> (that tuple, its record): a node's tuple is asked about again and
        # again, and hashing a 64-layer key costs more than the rest of the lookup
        self._seen: dict[int, tuple[Layers, _Record]] = {}
        self.by_layer: dict[tuple[int, bytes], _Record] = {}
        for layers, packed_names, attrs_packed in records:
            bound = tuple((p + first, rel) for p, rel in layers)
            rec = _Record(bound, packed_names, dict(bound), attrs_packed)
            self.records[bound] = rec
            for layer in bound:
                self.by_layer.setdefault(layer, rec)

    def entries(self, lowers: Layers, name: bytes
                ) -> tuple[list[tuple[int, BranchEntry]], dict[int, bytes]] | None:
        """What the lower layers LOWERS (a directory node's `lowers`) hold under NAME, as
        (branch, entry) top-first without the plain missing ones, and the layers' paths by
        branch; None when the index does not describe that directory or the name involves a
        moved directory (probe instead)."""
        seen = self._seen.get(id(lowers))
        if seen is not None and seen[0] is lowers:
            rec = seen[1]
        else:
            found = self.records.get(lowers)
            if found is None:
                return None
            rec = found
            if len(self._seen) >= SEEN_MAX:
                self._seen.clear()
            self._seen[id(lowers)] = (lowers, rec)
        codes = rec.names.get(name)
        if codes is None:
            return [], rec.rels
        out = []
        first = self.first
        for i in range(0, len(codes), 2):
            c = codes[i + 1]
            if c & _REDIRECT and not c & _OPAQUE:
                return None
            out.append((codes[i] + first, _ENTRIES[c]))
        return out, rec.rels

    def drop_caches(self) -> None:
        """Forget what was derived from the records on demand (`Union.shrink`)."""
        self._seen.clear()
        for rec in self.records.values():
            rec.listings = None
            rec.raw = rec.slots = rec._names = None

    def stat(self, branch: int, rel: bytes) -> os.stat_result | None:
        """The lstat of REL in lower BRANCH as recorded at build, without a system call; None
        when attributes are not served (`attrs`) or the index does not describe REL."""
        if not self.attrs:
            return None
        parent, name = split(rel)
        rec = self.by_layer.get((branch, parent))
        if rec is None:
            return None
        slots = rec.slots
        if slots is None:
            slots = self._decode(rec)
        slot = slots.get(name)
        if slot is None:
            return None
        pos = branch - self.first
        codes = rec.names[name]
        for i in range(0, len(codes), 2):
            statable = codes[i + 1] & 3 in _STATABLE
            if codes[i] == pos:
                if not statable:
                    return None
                assert rec.raw is not None
                return _stat_result(rec.raw, slot)
            if statable:
                slot += 1
        return None

    @staticmethod
    def _decode(rec: _Record) -> dict[bytes, int]:
        rec.raw = zlib.decompress(rec.attrs)
        slots: dict[bytes, int] = {}
        n = 0
        for name, codes in rec.names.items():
            k = sum(1 for i in range(1, len(codes), 2) if codes[i] & 3 in _STATABLE)
            if k:
                slots[name] = n
                n += k
        rec.slots = slots
        return slots

    def view(self, branch: int) -> BranchView:
        return BranchView(self, branch)

    def listing(self, branch: int, rel: bytes) -> Listing | None:
        rec = self.by_layer.get((branch, rel))
        if rec is None:
            return None
        if rec.listings is None:
            rec.listings = self._listings(rec)
        return rec.listings.get(branch)

    def _listings(self, rec: _Record) -> dict[int, Listing]:
        first = self.first
        entries: dict[int, dict[bytes, BranchEntry]] = {b: {} for b, _ in rec.layers}
        hidden: dict[int, set[bytes]] = {b: set() for b, _ in rec.layers}
        for name, codes in rec.names.items():
            for i in range(0, len(codes), 2):
                b = codes[i] + first
                c = codes[i + 1]
                kind = _KINDS[c & 3]
                if kind is not Kind.MISSING:
                    entries[b][name] = _LISTED[kind]
                if c & _HIDES:
                    hidden[b].add(name)
        return {b: Listing(entries[b], frozenset(hidden[b])) for b, _ in rec.layers}

    def dir_info(self, branch: int, rel: bytes) -> tuple[bool, bytes | None] | None:
        """(opaque, redirect) of directory REL of a lower branch, None if not indexed."""
        pos = branch - self.first
        if not rel:
            return self.roots[pos] if 0 <= pos < len(self.roots) else None
        parent, name = split(rel)
        rec = self.by_layer.get((branch, parent))
        if rec is None:
            return None
        codes = rec.names.get(name, ())
        for i in range(0, len(codes), 2):
            if codes[i] == pos:
                c = codes[i + 1]
                if c & 3 != Kind.DIR.value:
                    return None
                return bool(c & _OPAQUE), self.redirects.get((pos, rel))
        return None


class BranchView:
    """One lower branch's part of the index, for `Branch.listing` / `Branch.dir_info`."""

    __slots__ = ("branch", "index")

    def __init__(self, index: LowerIndex, branch: int) -> None:
        self.index = index
        self.branch = branch

    def listing(self, rel: bytes) -> Listing | None:
        return self.index.listing(self.branch, rel)

    def dir_info(self, rel: bytes) -> tuple[bool, bytes | None] | None:
        return self.index.dir_info(self.branch, rel)

    def names(self, rel: bytes) -> tuple[Mapping[bytes, object], Iterable[bytes]] | None:
        lst = self.index.listing(self.branch, rel)
        return None if lst is None else (lst.entries, lst.hidden)

    def stat(self, rel: bytes) -> os.stat_result | None:
        return self.index.stat(self.branch, rel)

    def learn_listing(self, rel: bytes, st: os.stat_result, lst: Listing) -> None:
        pass  # the index is built by `build`, not learnt

    def learn_dir_info(self, rel: bytes, st: os.stat_result,
                       info: tuple[bool, bytes | None]) -> None:
        pass

    def stat_by_handle(self, rel: bytes) -> os.stat_result | None:
        return None  # (`stat` serves the index's attributes where the check vouches for them)

    def learn_handle(self, rel: bytes, dir_fd: int, name: bytes) -> None:
        pass


def load(path: str, branches: Sequence[Branch], first: int, check: str = "dirs"
         ) -> LowerIndex:
    """Read the index at PATH for the lower BRANCHES (top-first, numbered from FIRST) and check
    it against them (`check`: "dirs" or "roots", see the module docstring)."""
    if check not in CHECKS:
        raise LowerIndexError(f"lowerindex_check: expected one of {', '.join(CHECKS)}, "
                              f"got {check!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = marshal.loads(raw)  # (what follows the marshal, the checksum, is ignored)
    except OSError as e:
        raise LowerIndexError(f"lower index {path!r}: {e.strerror or e}") from None
    except (EOFError, ValueError, TypeError):
        raise LowerIndexError(f"lower index {path!r}: not an index file") from None
    if not (isinstance(data, tuple) and len(data) == 7 and data[0] == MAGIC):
        raise LowerIndexError(f"lower index {path!r}: not an index file")
    if data[1] != VERSION:
        raise LowerIndexError(f"lower index {path!r}: format version {data[1]}, expected "
                          f"{VERSION}: rebuild it (unionfs index build)")
    if unseal(raw) is None:
        raise LowerIndexError(f"lower index {path!r}: damaged (its checksum does not match): "
                              f"rebuild it (unionfs index build)")
    _, _, idents, roots, records, redirects, dirstats = data
    _check(path, idents, branches, dirstats if check != "roots" else ())
    index = LowerIndex(first, roots, records, redirects, attrs=check in ATTR_CHECKS)
    if check == "files":
        _check_files(path, index, branches)
        index.drop_caches()  # decoded for the check: decoded again on demand
    return index


def _stale(path: str, layer: str, why: str) -> LowerIndexError:
    return LowerIndexError(f"lower index {path!r} is stale: layer {layer!r} {why}; rebuild it "
                       f"(unionfs index build)")


def _check(path: str, idents: Sequence[tuple[str, int, int, int, int]],
           branches: Sequence[Branch], dirstats: Sequence[tuple[int, bytes, int, int, int]]
           ) -> None:
    if len(idents) != len(branches):
        raise LowerIndexError(f"lower index {path!r} was built for {len(idents)} layers, the mount "
                          f"has {len(branches)}")
    for (built, dev, ino, mtime, ctime), b in zip(idents, branches, strict=True):
        st = os.fstat(b.fd)
        if st.st_ino == ino and st.st_dev != dev and os.path.realpath(b.path) == built:
            # the attributes carry st_dev (inode numbers derive from it): refuse, never remap
            raise _stale(path, b.path, f"is on another device now (st_dev {st.st_dev}, was "
                                       f"{dev})")
        if (st.st_dev, st.st_ino) != (dev, ino):
            raise LowerIndexError(f"lower index {path!r} was built for other layers: {b.path!r} "
                              f"is not {built!r}")
        if (st.st_mtime_ns, st.st_ctime_ns) != (mtime, ctime):
            raise _stale(path, b.path, "changed at its root")
    for pos, rel, ino, mtime, ctime in dirstats:
        b = branches[pos]
        try:
            st = os.stat(rel or b".", dir_fd=b.fd, follow_symlinks=False)
        except OSError:
            raise _stale(path, b.path, f"lost {os.fsdecode(rel)!r}") from None
        if not stat.S_ISDIR(st.st_mode) or (st.st_ino, st.st_mtime_ns, st.st_ctime_ns) != (
                ino, mtime, ctime):
            raise _stale(path, b.path, f"changed in {os.fsdecode(rel) or '/'!r}")


def _check_files(path: str, index: LowerIndex, branches: Sequence[Branch]) -> None:
    """Compare the recorded attributes of every indexed object with its lstat now (all but
    the access time): an object modified, replaced or re-linked in place makes the index stale."""
    done: set[tuple[int, bytes]] = set()
    for rec in index.records.values():
        for bno, rel in rec.layers:
            if (bno, rel) in done:
                continue
            done.add((bno, rel))
            pos = bno - index.first
            b = branches[pos]
            names = [n for n, codes in rec.names.items()
                     if any(codes[i] == pos and codes[i + 1] & 3 in _STATABLE
                            for i in range(0, len(codes), 2))]
            if not names:
                continue
            try:
                fd = b.open_dir(rel)
            except OSError:
                raise _stale(path, b.path, f"lost {os.fsdecode(rel)!r}") from None
            try:
                for name in names:
                    want = index.stat(bno, join(rel, name))
                    assert want is not None
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except OSError:
                        st = None
                    if st is None or _comparable(st) != _comparable(want):
                        what = os.fsdecode(join(rel, name))
                        raise _stale(path, b.path, f"changed at {what!r}")
            finally:
                os.close(fd)


def attach(path: str, branches: Sequence[Branch], check: str = "dirs") -> LowerIndex:
    """Load the index at PATH for a mount's BRANCHES (the upper, if any, first) and let each
    lower branch read its directories from it."""
    lowers = [b for b in branches if not b.writable]
    first = lowers[0].index if lowers else 0
    index = load(path, lowers, first, check)
    for b in lowers:
        b.known = index.view(b.index)
    return index


def resolve_indexed(index: LowerIndex, upper: Branch | None, parent_path: bytes,
                    parent_upper: bool, lowers: Layers, name: bytes
                    ) -> tuple[Resolution, list[tuple[int, BranchEntry]], dict[int, bytes]] | None:
    """`Union._resolve` for a directory whose lower layers the index describes: the upper
    branch probed as always, the lower ones read from the index. None: probe instead (not
    indexed, or a moved directory is involved)."""
    found = index.entries(lowers, name)
    if found is None:
        return None
    below, rels = found
    entries: list[tuple[int, BranchEntry]] = []
    upper_index = -1
    if parent_upper:
        assert upper is not None
        ue = upper.entry(parent_path, name)
        if ue.kind is Kind.DIR and ue.redirect is not None and not ue.opaque:
            return None
        upper_index = upper.index
        entries.append((upper_index, ue))
    entries += below
    res = resolve(entries)
    paths: dict[int, bytes] = {}
    for b in res.branches:
        paths[b] = join(parent_path if parent_upper and b == upper_index else rels[b], name)
    return res, entries, paths
