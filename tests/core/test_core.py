"""The pure core against a model: applying layers bottom-up, the way an OCI runtime unpacks
them, must give the same view as `resolve` and `merge` computing it top-down."""

from __future__ import annotations

import errno

from hypothesis import given
from hypothesis import strategies as st

from unionfs.core.formats import (
    check_name,
    is_chardev_whiteout,
    is_private_xattr,
    opaque_value,
    whiteout_target,
)
from unionfs.core.readdir import Listing, count_subdirs, merge
from unionfs.core.resolve import (
    BranchEntry,
    Kind,
    absolute_redirects,
    lower_exists,
    redirected_paths,
    resolve,
    whiteouts_refuse_removal,
)

NAMES = [b"a", b"b", b"c", b"d"]

entry_st = st.one_of(
    st.just(BranchEntry(Kind.WHITEOUT)),
    st.just(BranchEntry(Kind.OTHER)),
    st.builds(lambda o: BranchEntry(Kind.DIR, opaque=o), st.booleans()),
)
listing_st = st.builds(
    lambda entries, hidden: Listing(entries, frozenset(hidden)),
    st.dictionaries(st.sampled_from(NAMES), entry_st, max_size=4),
    st.sets(st.sampled_from(NAMES), max_size=2),
)
stack_st = st.lists(listing_st, min_size=1, max_size=5)


def model(stack: list[Listing]) -> dict[bytes, tuple[Kind, tuple[int, ...]]]:
    """Apply branches bottom-up: .wh. files delete, whiteouts delete, opaque dirs replace."""
    state: dict[bytes, tuple[Kind, tuple[int, ...]]] = {}
    for b in reversed(range(len(stack))):
        lst = stack[b]
        for name in lst.hidden:
            state.pop(name, None)
        for name, e in lst.entries.items():
            if e.kind is Kind.WHITEOUT:
                state.pop(name, None)
            elif e.kind is Kind.DIR:
                old = state.get(name)
                if old is not None and old[0] is Kind.DIR and not e.opaque:
                    state[name] = (Kind.DIR, (b, *old[1]))
                else:
                    state[name] = (Kind.DIR, (b,))
            else:
                state[name] = (Kind.OTHER, (b,))
    return state


@given(stack_st)
def test_resolve_and_merge_agree_with_bottom_up_model(stack: list[Listing]) -> None:
    expected = model(stack)
    for name in NAMES:
        res = resolve((b, lst.entry(name)) for b, lst in enumerate(stack))
        if name in expected:
            assert (res.kind, res.branches) == expected[name]
        else:
            assert res.kind is Kind.MISSING
    merged = merge(enumerate(stack))
    assert sorted(m.name for m in merged) == sorted(expected)
    assert len(merged) == len(expected)  # each name once
    for m in merged:
        kind, branches = expected[m.name]
        assert m.is_dir == (kind is Kind.DIR)
        assert m.branch == branches[0]


@given(stack_st)
def test_subdirectories_are_counted_as_merge_shows_them(stack: list[Listing]) -> None:
    assert count_subdirs(enumerate(stack)) == sum(m.is_dir for m in merge(enumerate(stack)))


@given(stack_st)
def test_lower_exists_iff_removing_top_reveals_something(stack: list[Listing]) -> None:
    for name in NAMES:
        entries = [(b, lst.entry(name)) for b, lst in enumerate(stack)]
        below = model(stack[1:]) if not stack[0].entry(name).hides_below else {}
        assert lower_exists(entries) == (name in below)


def test_formats() -> None:
    assert is_chardev_whiteout(0o20000, 0)
    assert not is_chardev_whiteout(0o20000, 0x103)
    assert not is_chardev_whiteout(0o100000, 0)
    assert opaque_value(b"y") == "y" and opaque_value(b"x") == "x"
    assert opaque_value(b"n") == "" and opaque_value(None) == ""
    assert whiteout_target(b".wh.foo") == b"foo"
    assert whiteout_target(b".wh..wh..opq") is None
    assert whiteout_target(b"foo") is None
    assert whiteout_target(b".wh..") is None
    assert is_private_xattr(b"trusted.overlay.opaque")
    assert is_private_xattr(b"user.fuseoverlayfs.origin")
    assert not is_private_xattr(b"user.mine")
    assert check_name(b"x" * 255) == 0
    assert check_name(b"x" * 256) == errno.ENAMETOOLONG
    assert check_name(b".wh.x") == errno.EINVAL
    assert check_name(b"..") == errno.EINVAL


@given(st.binary(min_size=1, max_size=300))
def test_check_name_accepts_every_byte_but_slash_and_nul(name: bytes) -> None:
    code = check_name(name)
    if len(name) > 255:
        assert code == errno.ENAMETOOLONG
    elif b"/" in name or b"\0" in name or name in (b".", b"..") or name.startswith(b".wh."):
        assert code == errno.EINVAL
    else:
        assert code == 0


def test_absolute_redirects_follow_moved_ancestors() -> None:
    # relative values name a sibling in the parent's lower directory, which a moved ancestor
    # determines; absolute ones stand alone (trailing NULs as some writers leave them)
    got = absolute_redirects({b"x": b"/a/b\0", b"x/s": b"t", b"x/u/v": b"w", b"y/z": b"/q"})
    assert got == {b"x": b"a/b", b"x/s": b"a/b/t", b"x/u/v": b"a/b/u/w", b"y/z": b"q"}


def test_redirected_paths_through_moves_in_several_branches() -> None:
    # the branch holds d/f; the one above moved d to e, the top one moved e to g/h
    got = redirected_paths(b"d/f", [{b"e": b"d"}, {b"g/h": b"e"}, {}])
    assert got == {b"d/f", b"e/f", b"g/h/f"}
    assert redirected_paths(b"dd/f", [{b"e": b"d"}]) == {b"dd/f"}  # a prefix by name only
    assert redirected_paths(b"f", [{b"r": b""}]) == {b"f", b"r/f"}  # a move of the root's content


def test_whiteouts_refuse_removal_only_for_pure_upper_directories() -> None:
    def refuse(upper_only: bool = True, copied_up: bool = False, holds: bool = True,
               below: bool = False, replaced: bool = False) -> bool:
        return whiteouts_refuse_removal(upper_only, copied_up, holds, below, replaced)

    assert refuse() and refuse(replaced=True) and refuse(below=True, replaced=True)
    assert not refuse(below=True)  # rmdir leaves a whiteout: overlayfs clears the directory
    assert not refuse(upper_only=False, replaced=True)
    assert not refuse(copied_up=True, replaced=True)
    assert not refuse(holds=False, replaced=True)
