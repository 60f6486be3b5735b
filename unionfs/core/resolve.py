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
from collections.abc import Iterable, Mapping, Sequence

from ..tuples import NamedTuple


class Kind(enum.Enum):
    MISSING = 0
    WHITEOUT = 1
    DIR = 2
    OTHER = 3


class BranchEntry(NamedTuple):
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


class Resolution(NamedTuple):
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
    # (the kinds as locals: a deep stack folds one entry per layer, and looking an enum member
    # up costs more than the rest of the step)
    DIR, OTHER, WHITE = Kind.DIR, Kind.OTHER, Kind.WHITEOUT
    layers: list[int] = []
    for branch, e in entries:
        k = e[0]  # (kind)
        if k is DIR:
            layers.append(branch)
            if e[1] or e[2]:  # (opaque, hides_below)
                break
            continue
        if k is WHITE:
            break
        if k is OTHER:
            if not layers:
                return Resolution(OTHER, (branch,))
            break
        if e[2]:
            break
    if layers:
        return Resolution(DIR, tuple(layers))
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


def whiteouts_refuse_removal(upper_only: bool, copied_up: bool, holds_whiteouts: bool,
                             lower_below: bool, replaced: bool) -> bool:
    """Whether removing (rmdir) or replacing (rename over it) a directory whose merged view is
    empty must fail with ENOTEMPTY because of the whiteouts its upper directory still holds.

    Kernel overlayfs' rule (fs/overlayfs/dir.c): a "pure upper" directory, one that only the
    upper branch holds (nothing below, or opaque) and that was not copied up (no
    ``overlay.origin``), is removed or replaced with the plain system call on the upper
    directory, without overlayfs' emptiness check that clears whiteouts first; whiteouts in it
    (which hide nothing) then make that call fail. rmdir takes that path only when nothing lies
    below the name (else it leaves a whiteout, clearing the directory first); rename always.
    Overlayfs never leaves whiteouts in such a directory itself; they come from hand-made or
    converted (OCI) layers.
    """
    if not upper_only or copied_up or not holds_whiteouts:
        return False
    return replaced or not lower_below


def absolute_redirects(redirects: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """One branch's moved directories (path in the branch -> ``overlay.redirect`` value) as
    path -> where the branches below hold the directory's content (a path from their root).

    An absolute value is that path; a relative one names a sibling in the parent's own lower
    directory, which is where the parent's nearest moved ancestor (if any) leads."""

    def lower_path(rel: bytes) -> bytes:
        v = redirects.get(rel)
        if v is not None:
            v = v.rstrip(b"\0")
            if v.startswith(b"/"):
                return v.strip(b"/")
        parent, _, name = rel.rpartition(b"/")
        base = lower_path(parent) if parent else b""
        name = v if v else name
        return base + b"/" + name if base else name

    return {rel: lower_path(rel) for rel in redirects if rel}


def redirected_paths(path: bytes, redirects: Sequence[Mapping[bytes, bytes]]) -> set[bytes]:
    """The union paths that may show what a branch holds at PATH, moved directories considered.

    REDIRECTS: for each branch above that one, nearest first, its moved directories as
    `absolute_redirects` gives them. A directory moved in a branch shows, under its new path,
    what the branches below show under its target; so a path below a target also appears below
    the moved directory. These are candidates (whiteouts, opaque directories and names in
    between may still hide them): the caller resolves each one."""
    paths = {path}
    for layer in redirects:
        if not layer:
            continue
        more = set()
        for p in paths:
            for moved, target in layer.items():
                if not target:
                    more.add(moved + b"/" + p)
                elif p.startswith(target + b"/"):
                    more.add(moved + p[len(target):])
        paths |= more
    return paths
