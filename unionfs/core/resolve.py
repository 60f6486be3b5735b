"""Which branch holds a name: the one place that owns the lookup rules of the union.

Branches are numbered top-first; when an upper branch exists it is number 0. The I/O side
describes what one branch directory holds for a name as a `BranchEntry` (whiteout markers already
classified by `formats`), and `resolve` folds the entries of the branches that contribute to a
directory into one answer:

- the first non-directory found, if nothing above it was a directory, is the object;
- directories merge: each one found is a layer of the result, until an opaque one or one whose
  branch hides the name below it (OCI ``.wh.NAME``) ends the descent;
- a whiteout ends the descent; if nothing was found above it the name does not exist;
- a non-directory below a directory is hidden by that directory.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Kind(enum.Enum):
    MISSING = 0
    WHITEOUT = 1
    DIR = 2
    OTHER = 3


@dataclass(frozen=True, slots=True)
class BranchEntry:
    """What one branch directory holds under one name.

    ``hides_below``: the branch says the name is whited out in the branches below it (an OCI
    ``.wh.NAME`` file beside it); it may hold the name itself too.
    ``opaque``: for a directory, it hides the same directory in the branches below.
    ``redirect``: for a directory moved by a rename, the path (absolute from the branch roots, or
    a sibling name) where the branches below hold its content; the caller looks that up instead
    of the name.
    """

    kind: Kind
    opaque: bool = False
    hides_below: bool = False
    redirect: bytes | None = None  # a moved directory: where its lower layers are


MISSING = BranchEntry(Kind.MISSING)
HIDDEN = BranchEntry(Kind.MISSING, hides_below=True)
WHITEOUT = BranchEntry(Kind.WHITEOUT)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The merged meaning of a name: MISSING, a DIR made of `branches` (top-first), or OTHER
    (a non-directory) held by ``branches[0]``."""

    kind: Kind
    branches: tuple[int, ...] = ()

    @property
    def top(self) -> int:
        return self.branches[0]


NOT_FOUND = Resolution(Kind.MISSING)


def resolve(entries: Iterable[tuple[int, BranchEntry]]) -> Resolution:
    """Fold per-branch entries (top-first, only branches that contribute to the parent)."""
    layers: list[int] = []
    for branch, e in entries:
        k = e.kind
        if k is Kind.WHITEOUT:
            break
        if k is Kind.DIR:
            layers.append(branch)
            if e.opaque or e.hides_below:
                break
            continue
        if k is Kind.OTHER:
            if not layers:
                return Resolution(Kind.OTHER, (branch,))
            break
        if e.hides_below:
            break
    if layers:
        return Resolution(Kind.DIR, tuple(layers))
    return NOT_FOUND


def lower_exists(entries: Iterable[tuple[int, BranchEntry]], upper: int = 0) -> bool:
    """Whether removing the upper branch's entry would reveal something below it.

    This decides if a removal must leave a whiteout. A ``.wh.NAME`` in the upper branch already
    hides whatever is below, so it counts as 'nothing below'.
    """
    below: list[tuple[int, BranchEntry]] = []
    for branch, e in entries:
        if branch == upper:
            if e.hides_below:
                return False
            continue
        below.append((branch, e))
    return resolve(below).kind is not Kind.MISSING
