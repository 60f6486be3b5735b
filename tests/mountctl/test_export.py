"""mountctl.export: upper directories in every encoding -> OCI layer tars.

Uppers and image layers are built by hand here (as root: char-device whiteouts, trusted
xattrs), exported, and checked entry by entry; the round-trip test then extracts the exported
layer into a store and compares, through two read-only unionfs mounts, the image plus the
exported layer with the image plus the upper directory itself.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

from mountctl.export import committed_config, export_upper
from mountctl.layers import extract_layer
from tests.helpers.mounts import mounted


def mk(path: Path, data: bytes | None = b"", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        path.mkdir(exist_ok=True)
    else:
        path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def export(upper: Path, lowers: list[Path], skip: tuple[str, ...] = ()
           ) -> tuple[list[tarfile.TarInfo], dict[str, bytes], str]:
    buf = io.BytesIO()
    diff_id = export_upper(upper, lowers, buf, skip=skip)
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        contents = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in members if m.isreg()}
    import hashlib
    assert diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    return members, contents, diff_id


def image(tmp: Path) -> list[Path]:
    """Two image layers, top first: l1 over l0."""
    l0, l1 = tmp / "l0", tmp / "l1"
    mk(l0 / "a/keep.txt", b"keep")
    mk(l0 / "a/gone.txt", b"gone")
    mk(l0 / "a/sub/deep.txt", b"deep")
    mk(l0 / "b/x.txt", b"x")
    mk(l0 / "old/one.txt", b"one")
    mk(l0 / "old/hidden.txt", b"hidden by l1")
    mk(l0 / "old/inner/two.txt", b"two")
    mk(l0 / "old/opq/below.txt", b"below")
    mk(l1 / "old/.wh.hidden.txt")
    mk(l1 / "old/three.txt", b"three")
    mk(l1 / "old/opq/.wh..wh..opq")
    mk(l1 / "old/opq/above.txt", b"above")
    return [l1, l0]


def test_every_whiteout_and_opaque_encoding(tmp_path: Path) -> None:
    lowers = image(tmp_path)
    up = tmp_path / "upper"
    whiteout(up / "a/gone.txt")                            # overlayfs whiteout
    mk(up / "a/.wh.sub")                                   # OCI whiteout (unprivileged form)
    mk(up / "b", None)
    os.setxattr(up / "b", "trusted.overlay.opaque", b"y")  # opaque by trusted xattr
    mk(up / "b/new.txt", b"n")
    mk(up / "c", None)
    os.setxattr(up / "c", "user.overlay.opaque", b"y")     # opaque by user xattr
    mk(up / "d/.wh..wh..opq")                              # opaque by marker entry
    mk(up / "d/z.txt", b"z")
    mk(up / "e", None)
    os.setxattr(up / "e", "trusted.overlay.opaque", b"x")  # holds xattr whiteouts
    mk(up / "e/xw")
    os.setxattr(up / "e/xw", "trusted.overlay.whiteout", b"")
    mk(up / "e/real.txt", b"r")
    os.setxattr(up / "e/real.txt", "user.note", b"kept")
    os.setxattr(up / "e/real.txt", "user.unionfs.private", b"dropped")
    members, contents, _ = export(up, lowers)
    names = [m.name for m in members]
    assert names == ["a", "a/.wh.gone.txt", "a/.wh.sub",
                     "b", "b/.wh..wh..opq", "b/new.txt",
                     "c", "c/.wh..wh..opq",
                     "d", "d/.wh..wh..opq", "d/z.txt",
                     "e", "e/.wh.xw", "e/real.txt"]
    by = {m.name: m for m in members}
    assert by["e/real.txt"].pax_headers.get("SCHILY.xattr.user.note") == "kept"
    assert not any("overlay" in k or "unionfs" in k for m in members for k in m.pax_headers)
    assert contents["d/z.txt"] == b"z"


def test_redirected_directory_is_flattened(tmp_path: Path) -> None:
    lowers = image(tmp_path)
    up = tmp_path / "upper"
    # `mv /old /new` then a change inside, as unionfs leaves it (origin whited out)
    mk(up / "new", None)
    os.setxattr(up / "new", "trusted.overlay.redirect", b"/old")
    whiteout(up / "old")
    whiteout(up / "new/one.txt")
    mk(up / "new/added.txt", b"added")
    mk(up / "new/inner/more.txt", b"more")
    # `mv /a/sub /a/moved` with a relative redirect and no whiteout left at the origin
    mk(up / "a/moved", None)
    os.setxattr(up / "a/moved", "user.overlay.redirect", b"sub")
    members, contents, _ = export(up, lowers)
    names = [m.name for m in members]
    assert names.index("new/.wh..wh..opq") == names.index("new") + 1
    assert sorted(n for n in names if n.startswith("new/")) == [
        "new/.wh..wh..opq", "new/added.txt", "new/inner", "new/inner/more.txt",
        "new/inner/two.txt", "new/opq", "new/opq/above.txt", "new/three.txt"]
    assert contents["new/inner/two.txt"] == b"two" and contents["new/three.txt"] == b"three"
    assert ".wh.old" in names
    assert "a/moved/deep.txt" in names and "a/moved/.wh..wh..opq" in names
    assert names[-1] == "a/.wh.sub"  # origin hidden at the end: the upper did not do it
    assert names.count("a") == 1


def test_placeholders_hardlinks_and_special_files(tmp_path: Path) -> None:
    lowers = image(tmp_path)
    up = tmp_path / "upper"
    mk(up / "proc", None)
    mk(up / "etc/hosts")
    mk(up / "b/x.txt", b"")              # in the image: a real change even though empty
    mk(up / "tmp/kept.txt", b"k")        # a mount point that is no longer empty
    mk(up / "vol", None)
    mk(up / "h1", b"same")
    os.link(up / "h1", up / "h2")
    os.mkfifo(up / "fifo")
    os.symlink("h1", up / "sym")
    os.mknod(up / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    members, _, _ = export(up, lowers, skip=("proc", "etc/hosts", "b/x.txt", "tmp", "vol"))
    by = {m.name: m for m in members}
    assert set(by) == {"b", "b/x.txt", "tmp", "tmp/kept.txt", "h1", "h2", "fifo", "sym",
                       "null"}
    assert by["h2"].islnk() and by["h2"].linkname == "h1"
    assert by["fifo"].isfifo() and by["sym"].issym() and by["sym"].linkname == "h1"
    assert by["null"].ischr() and (by["null"].devmajor, by["null"].devminor) == (1, 3)


def test_round_trip_through_a_store_equals_the_upper(tmp_path: Path) -> None:
    lowers = image(tmp_path)
    up = tmp_path / "upper"
    whiteout(up / "a/gone.txt")
    mk(up / "a/keep.txt", b"changed", mode=0o600)
    mk(up / "b/.wh..wh..opq")
    mk(up / "b/y.txt", b"y")
    mk(up / "new", None)
    os.setxattr(up / "new", "trusted.overlay.redirect", b"/old")
    whiteout(up / "old")
    mk(up / "new/added.txt", b"added")
    buf = io.BytesIO()
    diff_id = export_upper(up, lowers, buf)
    store = tmp_path / "store"
    res = extract_layer(io.BytesIO(buf.getvalue()), store, diff_id)

    def view(mnt: Path) -> dict[str, tuple[int, bytes]]:
        out = {}
        for top, dirs, files in os.walk(mnt):
            for n in dirs + files:
                p = Path(top) / n
                st = os.lstat(p)
                out[str(p.relative_to(mnt))] = (
                    st.st_mode, p.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
        return out

    with mounted("unionfs", [up, *lowers], None, None, tmp_path / "m1") as m1, \
            mounted("unionfs", [res.path, *lowers], None, None, tmp_path / "m2") as m2:
        want, got = view(m1.mnt), view(m2.mnt)
    assert "new/one.txt" in want and "old" not in want
    assert got == want


def test_committed_config() -> None:
    base: dict[str, Any] = {"config": {"Cmd": ["sh"]},
                            "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]},
                            "history": [{"created_by": "x"}]}
    cfg = committed_config(base, "sha256:b", "mountctl commit abc")
    assert cfg["rootfs"]["diff_ids"] == ["sha256:a", "sha256:b"]
    assert cfg["history"][-1]["created_by"] == "mountctl commit abc"
    assert cfg["config"] == {"Cmd": ["sh"]} and base["rootfs"]["diff_ids"] == ["sha256:a"]
