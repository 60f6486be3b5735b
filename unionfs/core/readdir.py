"""Merging one directory's listings across branches.

Input: the listings of the branches that contribute to a directory (as decided by `resolve`),
top-first, each a mapping name -> `BranchEntry` plus the set of names that branch hides below it.
Output: the merged names in a stable order, each with the branch that supplies it and whether it
is a directory. Whiteouts and markers never appear; a name appears once.

Offsets handed to the kernel are positions in this merged list, taken once per opendir, so
telldir/seekdir are stable for the life of the handle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .resolve import HIDDEN, MISSING, BranchEntry, Kind


@dataclass(slots=True)
class Listing:
    """One branch directory, classified: real entries and whiteouts, plus names it hides below."""

    entries: dict[bytes, BranchEntry] = field(default_factory=dict)
    hidden: frozenset[bytes] = frozenset()
    opaque_marker: bool = False  # holds .wh..wh..opq

    def entry(self, name: bytes) -> BranchEntry:
        e = self.entries.get(name)
        if e is not None:
            if name in self.hidden:
                return BranchEntry(e.kind, e.opaque, True)
            return e
        return HIDDEN if name in self.hidden else MISSING


@dataclass(frozen=True, slots=True)
class MergedEntry:
    name: bytes
    branch: int
    is_dir: bool


def merge(listings: Iterable[tuple[int, Listing]]) -> list[MergedEntry]:
    """Merge branch listings (top-first) into the union's view of the directory.

    A name supplied by a non-directory in a higher branch hides directories of the same name
    below it, and a directory shown from a higher branch is the one reported; which layers a
    directory merges is `resolve`'s business, not this function's.
    """
    out: list[MergedEntry] = []
    seen: set[bytes] = set()
    stopped: set[bytes] = set()
    for branch, lst in listings:
        for name, e in lst.entries.items():
            if name in seen or name in stopped:
                continue
            if e.kind is Kind.WHITEOUT:
                stopped.add(name)
                continue
            seen.add(name)
            out.append(MergedEntry(name, branch, e.kind is Kind.DIR))
        stopped.update(lst.hidden)
    out.sort(key=lambda m: m.name)
    return out


def merged_names(listings: Iterable[tuple[int, Mapping[bytes, BranchEntry]]]) -> list[bytes]:
    """Names only; convenience for tests and emptiness checks."""
    return [m.name for m in merge((b, Listing(dict(e))) for b, e in listings)]
