"""Tests of the differential harness itself (no SUT needed; root for trusted.* xattrs and mknod).

The harness is also validated end to end by running it with the kernel on both sides
(`DIFF_SUT=overlay`: every comparison must agree) and with `DIFF_SUT=fuse-overlayfs`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
from hypothesis import given

from tests.differential.harness import (
    Snap,
    compare_meanings,
    kernel_view,
    snapshot,
    upper_meaning,
)
from tests.differential.settings import diff_settings, stack_strategy
from tests.helpers.layers import (
    Blob,
    Dir,
    File,
    HardLink,
    Layer,
    Stack,
    Symlink,
    Whiteout,
    kernel_honours_xattr_whiteouts,
    materialise,
    materialise_layer,
    to_oci,
)

pytestmark = pytest.mark.no_sut
View = dict[str, Snap]
Meaning = dict[str, tuple[object, ...]]

LOWER = Layer({
    "d": Dir(),
    "d/f": File(Blob(1, 100)),
    "d/g": File(Blob(2, 10)),
    "d/sub": Dir(),
    "d/sub/x": File(Blob(3, 5)),
    "e": Dir(),
    "h": File(Blob(4, 0)),
})


LOWER_DIR_ATTRS = ("dir", 0o755, 0, 0, None, None, None, (), None)


def _meaning(tmp: Path, name: str, upper: Layer, lower_view: View) -> Meaning:
    materialise_layer(upper, tmp / name)
    return upper_meaning(tmp / name, lower_view)


@pytest.fixture
def lower_view(tmp_path: Path) -> View:
    materialise_layer(LOWER, tmp_path / "lower")
    return kernel_view([tmp_path / "lower"], tmp_path / "view")


def test_whiteout_encodings_mean_the_same(tmp_path: Path, lower_view: View) -> None:
    chardev = _meaning(tmp_path, "u1", Layer({"d": Dir(), "d/f": Whiteout("chardev")}),
                       lower_view)
    xattr = _meaning(tmp_path, "u2", Layer({"d": Dir(), "d/f": Whiteout("xattr")}), lower_view)
    oci = _meaning(tmp_path, "u3", to_oci(Stack([], Layer({"d": Dir(),
                                                           "d/f": Whiteout()}))).upper,
                   lower_view)
    assert chardev == {"d/f": ("whiteout",), "d": ("dir", "merge", LOWER_DIR_ATTRS)}
    assert xattr == chardev and oci == chardev


def test_meaningless_marks_are_dropped(tmp_path: Path, lower_view: View) -> None:
    # a whiteout hiding nothing, an opaque mark with nothing below, an unchanged copy-up
    m = _meaning(tmp_path, "u", Layer({"zz": Whiteout(), "new": Dir(opaque=True),
                                       "h": File(Blob(4, 0)), "d": Dir()}), lower_view)
    assert m == {"new": ("dir", "new", LOWER_DIR_ATTRS)}


def test_opaque_encodings_mean_the_same(tmp_path: Path, lower_view: View) -> None:
    up = Layer({"d": Dir(opaque=True), "d/n": File(Blob(5, 3))})
    a = _meaning(tmp_path, "u1", up, lower_view)
    b = _meaning(tmp_path, "u2", to_oci(Stack([], up)).upper, lower_view)
    assert a == b
    assert a["d"][:2] == ("dir", "opaque")


def test_redirect_means_a_full_copy(tmp_path: Path, lower_view: View) -> None:
    """overlayfs (redirect_dir=on) renames a lower dir d -> r as: whiteout d + r with
    trusted.overlay.redirect=/d; a union that copies the directory up in full writes an opaque
    r with every file. Both mean the same on these lowers."""
    red = tmp_path / "u1"
    materialise_layer(Layer({"d": Whiteout(), "r": Dir(), "r/g": Whiteout()}), red)
    os.setxattr(red / "r", "trusted.overlay.redirect", b"/d")
    full = Layer({"d": Whiteout(), "r": Dir(opaque=True), "r/f": File(Blob(1, 100)),
                  "r/sub": Dir(), "r/sub/x": File(Blob(3, 5))})
    a = upper_meaning(red, lower_view)
    b = _meaning(tmp_path, "u2", full, lower_view)
    assert compare_meanings(a, b, "redirect", "copy") == []
    assert set(a) == {"d", "r", "r/f", "r/sub", "r/sub/x"}


def test_hard_link_groups_are_part_of_the_meaning(tmp_path: Path, lower_view: View) -> None:
    linked = _meaning(tmp_path, "u1", Layer({"a": File(Blob(9, 9)), "b": HardLink("a")}),
                      lower_view)
    copies = _meaning(tmp_path, "u2", Layer({"a": File(Blob(9, 9)), "b": File(Blob(9, 9))}),
                      lower_view)
    assert linked["a"][-1] == ("a", "b") and copies["a"][-1] == ()
    assert compare_meanings(linked, copies, "x", "y") != []


def test_materialised_stack_is_faithful(tmp_path: Path) -> None:
    stack = Stack([Layer({"s": File(Blob(7, 1_048_576, sparse=True)),
                          "l": Symlink("../zz"), "d": Dir(0o1777, 1000, 1000,
                                                          (("user.a", b"1"),))})])
    dirs = materialise(stack, tmp_path / "s")
    view = snapshot(dirs.lowers[0])
    assert view["s"].sha == Blob(7, 1_048_576, sparse=True).sha256()
    assert os.stat(dirs.lowers[0] / "s").st_blocks * 512 < 100_000  # really sparse
    assert view["l"].target == "../zz"
    assert (view["d"].mode, view["d"].uid, view["d"].xattrs) == (0o1777, 1000,
                                                                 (("user.a", b"1"),))


@diff_settings(20)
@given(stack=stack_strategy())
def test_oci_conversion_keeps_the_meaning_of_every_layer(stack: Stack) -> None:
    """The OCI rewrite of a layer means the same as the layer (judged by upper_meaning against
    the kernel's view of the layers below it)."""
    import tempfile

    from tests.differential.harness import rm_tree

    root = Path(tempfile.mkdtemp(prefix="unionfs-harness-"))
    try:
        dirs = materialise(stack, root / "orig")
        oci = materialise(to_oci(stack), root / "oci")
        for i in range(len(stack.lowers) - 1):
            below = kernel_view(dirs.lowers[i + 1:], root / f"view{i}")
            a = upper_meaning(dirs.lowers[i], below)
            b = upper_meaning(oci.lowers[i], below)
            assert compare_meanings(b, a, "oci", "original") == []
    finally:
        rm_tree(root)


@pytest.mark.skipif(tuple(int(x) for x in platform.release().split(".")[:2]) < (6, 7),
                    reason="xattr whiteouts need Linux >= 6.7")
def test_this_kernel_honours_xattr_whiteouts() -> None:
    assert kernel_honours_xattr_whiteouts()
