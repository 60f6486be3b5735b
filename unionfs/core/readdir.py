"""Merging one directory's listings across branches.

Input: the listings of the branches that contribute to a directory (as decided by `resolve`),
top-first, each a mapping name -> `BranchEntry` plus the set of names that branch hides below it.
Output: the merged names in a stable order, each with the branch that supplies it and whether it
is a directory. Whiteouts and markers never appear; a name appears once.

Offsets handed to the kernel (`with_offsets`) are derived from the names, not from positions:
an entry's offset is a hash of its name, and a listing is served in offset order. So a reader that
resumes at an offset neither repeats nor skips an entry that was there all along, however the
directory changed in between, and readdir needs no per-open state (the kernel may cache the listing
and come back at any offset).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping

from ..tuples import NamedTuple
from .resolve import HIDDEN, MISSING, BranchEntry, Kind


class Listing:
    """One branch directory, classified: real entries and whiteouts, plus names it hides below.

    (Plain classes here and in the engine, not dataclasses: every mount starts a Python
    process, and the dataclasses module and the classes it generates cost about 14 ms of the
    server's start-up.)"""

    __slots__ = ("entries", "hidden", "opaque_marker")

    def __init__(self, entries: dict[bytes, BranchEntry] | None = None,
                 hidden: frozenset[bytes] = frozenset(), opaque_marker: bool = False) -> None:
        self.entries: dict[bytes, BranchEntry] = {} if entries is None else entries
        self.hidden = hidden
        self.opaque_marker = opaque_marker  # holds .wh..wh..opq

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Listing):
            return NotImplemented
        return (self.entries, self.hidden, self.opaque_marker) == (
            other.entries, other.hidden, other.opaque_marker)

    __hash__ = None  # type: ignore[assignment]  # (mutable, as the dataclass was)

    def __repr__(self) -> str:
        return (f"Listing(entries={self.entries!r}, hidden={self.hidden!r}, "
                f"opaque_marker={self.opaque_marker!r})")

    def entry(self, name: bytes) -> BranchEntry:
        e = self.entries.get(name)
        if e is not None:
            if name in self.hidden:
                return BranchEntry(e.kind, e.opaque, True)
            return e
        return HIDDEN if name in self.hidden else MISSING


class MergedEntry(NamedTuple):
    """One name of a merged listing: the branch that supplies it, and whether it is a directory
    (a tuple: a listing of 100,000 names makes as many, and a frozen dataclass costs twice the
    time to build)."""

    name: bytes
    branch: int
    is_dir: bool


def merge(listings: Iterable[tuple[int, Listing]]) -> list[MergedEntry]:
    """Merge branch listings (top-first) into the union's view of the directory, in no
    particular order (`with_offsets` orders it).

    A name supplied by a non-directory in a higher branch hides directories of the same name
    below it, and a directory shown from a higher branch is the one reported; which layers a
    directory merges is `resolve`'s business, not this function's.
    """
    out: list[MergedEntry] = []
    append = out.append
    done: set[bytes] = set()  # names supplied, whited out or hidden by a branch above
    add = done.add
    whiteout, directory = Kind.WHITEOUT, Kind.DIR
    for branch, lst in listings:
        for name, e in lst.entries.items():
            if name in done:
                continue
            add(name)
            kind = e.kind
            if kind is not whiteout:
                append(MergedEntry(name, branch, kind is directory))
        done.update(lst.hidden)
    return out


def count_subdirs(listings: Iterable[tuple[int, Listing]]) -> int:
    """How many directories `merge` of LISTINGS shows, without merging them: what a merged
    directory's link count needs, asked far more often than its listing."""
    done: set[bytes] = set()  # names a branch above supplies, whites out or hides
    n = 0
    directory = Kind.DIR
    for _, lst in listings:
        entries = lst.entries
        for name, e in entries.items():
            if e.kind is directory and name not in done:
                n += 1
        done.update(entries)
        done.update(lst.hidden)
    return n


def merged_names(listings: Iterable[tuple[int, Mapping[bytes, BranchEntry]]]) -> list[bytes]:
    """Names only; convenience for tests and emptiness checks."""
    return sorted(m.name for m in merge((b, Listing(dict(e))) for b, e in listings))


# offsets 1 and 2 follow "." and ".."; entries' offsets lie above them, within a signed 64-bit off_t
FIRST_OFFSET = 3
_OFFSET_MASK = (1 << 62) - 1


def name_offset(name: bytes) -> int:
    """The offset of NAME in any listing of this process (a stable per-process hash)."""
    return (hash(name) & _OFFSET_MASK) + FIRST_OFFSET


class OffsetListing:
    """A merged listing in offset order: `offsets[i]` is the offset after `entries[i]`."""

    __slots__ = ("entries", "offsets", "prefetched", "subdirs")

    def __init__(self, offsets: list[int], entries: list[MergedEntry]) -> None:
        self.offsets = offsets
        self.entries = entries
        self.prefetched = False  # the executor has read the entries' attributes in one pass
        self.subdirs = -1  # how many entries are directories (counted when first asked)

    def __repr__(self) -> str:
        return f"OffsetListing(offsets={self.offsets!r}, entries={self.entries!r})"

    def count_subdirs(self) -> int:
        if self.subdirs < 0:
            self.subdirs = sum(1 for e in self.entries if e.is_dir)
        return self.subdirs

    def start(self, offset: int) -> int:
        """Index of the first entry a reader resuming at OFFSET has not seen."""
        return bisect.bisect_right(self.offsets, offset)


def with_offsets(entries: Iterable[MergedEntry],
                 offset_of: Callable[[bytes], int] = name_offset) -> OffsetListing:
    """Order ENTRIES by their names' offsets. Two names with the same hash (about one chance in
    2**62 per pair) get consecutive offsets, in name order, so every offset stays unique."""
    entries = entries if isinstance(entries, list) else list(entries)
    if offset_of is name_offset:  # (inlined: every listing of a directory passes here)
        by_offset = {(hash(e.name) & _OFFSET_MASK) + FIRST_OFFSET: e for e in entries}
    else:
        by_offset = {offset_of(e.name): e for e in entries}
    if len(by_offset) == len(entries):  # no two alike: sorting the offsets alone is enough
        offsets = sorted(by_offset)
        return OffsetListing(offsets, [by_offset[o] for o in offsets])
    keyed = sorted((offset_of(e.name), e.name, e) for e in entries)  # (names are unique)
    offsets = []
    prev = FIRST_OFFSET - 1
    for off, _, _e in keyed:
        if off <= prev:
            off = prev + 1  # pushed up past the one before, in name order
        offsets.append(off)
        prev = off
    return OffsetListing(offsets, [k[2] for k in keyed])
