"""Readdir offsets (core.readdir.with_offsets): unique, ordered, and stable for names that stay."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from unionfs.core.readdir import (
    FIRST_OFFSET,
    MergedEntry,
    OffsetListing,
    name_offset,
    with_offsets,
)

names = st.sets(
    st.binary(min_size=1, max_size=6).filter(lambda n: b"/" not in n and b"\0" not in n),
    max_size=40)


def entries(ns: set[bytes]) -> list[MergedEntry]:
    return [MergedEntry(n, 0, False) for n in sorted(ns)]


def read_from(listing: OffsetListing, offset: int) -> list[bytes]:
    return [e.name for e in listing.entries[listing.start(offset):]]


@given(names)
def test_offsets_are_unique_increasing_and_above_dot_entries(ns: set[bytes]) -> None:
    lst = with_offsets(entries(ns))
    assert sorted(e.name for e in lst.entries) == sorted(ns)
    assert all(o >= FIRST_OFFSET for o in lst.offsets)
    assert all(a < b for a, b in zip(lst.offsets, lst.offsets[1:], strict=False))
    assert all(o < 1 << 63 for o in lst.offsets)
    assert read_from(lst, 0) == read_from(lst, 2) == [e.name for e in lst.entries]


@given(names, names, names, st.integers(min_value=0, max_value=40))
def test_resuming_after_changes_never_repeats_or_skips_a_name_that_stayed(
        kept: set[bytes], removed: set[bytes], added: set[bytes], cut: int) -> None:
    removed -= kept
    added -= kept | removed
    before = with_offsets(entries(kept | removed))
    cut = min(cut, len(before.entries))
    seen = [e.name for e in before.entries[:cut]]
    resume = before.offsets[cut - 1] if cut else 0
    after = with_offsets(entries(kept | added))
    rest = read_from(after, resume)
    both = seen + rest
    assert len(both) == len(set(both))
    assert kept <= set(both)


def test_colliding_hashes_still_get_unique_offsets_in_name_order() -> None:
    lst = with_offsets(entries({b"c", b"a", b"b"}), offset_of=lambda n: 10)
    assert [e.name for e in lst.entries] == [b"a", b"b", b"c"]
    assert lst.offsets == [10, 11, 12]
    assert read_from(lst, 10) == [b"b", b"c"]
    # a name hashing right after a collision run is pushed up, not reordered
    lst = with_offsets(entries({b"a", b"b", b"z"}),
                       offset_of=lambda n: 11 if n == b"z" else 10)
    assert [e.name for e in lst.entries] == [b"a", b"b", b"z"] and lst.offsets == [10, 11, 12]


def test_name_offset_depends_only_on_the_name() -> None:
    assert name_offset(b"x") == name_offset(bytearray(b"x").decode().encode())
    assert with_offsets(entries({b"x", b"y"})).offsets == sorted(
        [name_offset(b"x"), name_offset(b"y")])
