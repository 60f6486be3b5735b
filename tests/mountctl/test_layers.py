"""mountctl.layers: safe extraction into the content-addressed store.

Unprivileged behaviour is tested two ways: in-process with `privileged=False` (no chown, mknod
or non-user xattr is attempted), and for real in a forked child that drops to uid/gid 65534
with setresuid before extracting (root only).
"""

from __future__ import annotations

import base64
import io
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mountctl.image import ImageError
from mountctl.layerdirs import layer_path, meta_path, read_meta, remove_tree
from mountctl.layers import ExtractResult, extract_layer
from tests.helpers.images import (
    COMPRESSIONS,
    MALICIOUS_KINDS,
    MTIME,
    Compression,
    Entry,
    Image,
    compress,
    layer_tar,
    malicious_layer,
    sha256,
)

IS_ROOT = os.geteuid() == 0


def extract(store: Path, layer: bytes, compression: Compression = "none",
            **kw: object) -> ExtractResult:
    blob = compress(layer, compression)
    return extract_layer(io.BytesIO(blob), store, sha256(layer), digest=sha256(blob),
                         **kw)  # type: ignore[arg-type]


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, size, mtime, content or link target) for a whole tree."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            body: object = None
            if stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_uid, st.st_gid, st.st_size,
                                             st.st_mtime_ns, body)
    return out


def store_leftovers(store: Path) -> list[str]:
    d = store / "layers" / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# --------------------------------------------------------------------------- the busybox layers


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_busybox_layers_extract(tmp_path: Path, busybox: Image,
                                compression: Compression) -> None:
    results = [extract(tmp_path, layer, compression) for layer in busybox.layers]
    assert all(r.created for r in results)
    l1, l2, l3 = (r.path for r in results)
    assert (l1 / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert stat.S_IMODE((l1 / "bin/busybox").stat().st_mode) == 0o755
    assert os.readlink(l1 / "bin/sh") == "busybox"
    assert (l1 / "bin/busybox").stat().st_mtime_ns == MTIME * 10**9
    assert (l1 / "bin").stat().st_mtime_ns == MTIME * 10**9  # set after its children
    assert stat.S_IMODE((l1 / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((l1 / "root").stat().st_mode) == 0o700
    assert (l1 / "data/hello-link.txt").stat().st_ino == (l1 / "data/hello.txt").stat().st_ino
    assert b"user:x:1000:1000" in (l1 / "etc/passwd").read_bytes()
    # OCI whiteouts are kept as plain files, for the union to interpret.
    wh = l2 / "data/.wh.remove-me.txt"
    assert wh.is_file() and not wh.is_symlink() and wh.stat().st_size == 0
    assert (l2 / "opq/.wh..wh..opq").is_file()
    assert (l2 / "opq/new.txt").read_bytes() == b"new in layer 2\n"
    assert not (l2 / "opq/old1.txt").exists()
    assert (l3 / "data/hello.txt").read_bytes() == b"hello from layer 3\n"
    assert stat.S_IMODE((l3 / "data/layer3.txt").stat().st_mode) == 0o600
    home = (l1 / "home/user").stat()
    if IS_ROOT:
        assert (home.st_uid, home.st_gid) == (1000, 1000)
        assert read_meta(tmp_path, busybox.diff_ids[0])["entries"] == {}
    assert store_leftovers(tmp_path) == sorted(
        [h[7:] for h in busybox.diff_ids] + [h[7:] + ".meta.json" for h in busybox.diff_ids])


def test_compressions_give_identical_trees(tmp_path: Path, busybox: Image) -> None:
    trees = []
    for c in COMPRESSIONS:
        r = extract(tmp_path / c, busybox.layers[0], c)
        trees.append(tree(r.path))
    assert trees[0] == trees[1] == trees[2]
    assert len(trees[0]) > 60


def test_present_layer_is_not_read_again(tmp_path: Path) -> None:
    layer = layer_tar([Entry("f", data=b"x")])
    assert extract(tmp_path, layer).created

    class Exploding(io.BytesIO):
        def read(self, *a: object) -> bytes:
            raise AssertionError("a present layer must not be read")

    r = extract_layer(Exploding(), tmp_path, sha256(layer))
    assert not r.created and r.bytes_read == 0
    assert r.path == layer_path(tmp_path, sha256(layer))


def test_progress_reports_bytes_read(tmp_path: Path, busybox: Image) -> None:
    seen: list[int] = []
    blob = compress(busybox.layers[0], "gzip")
    r = extract_layer(io.BytesIO(blob), tmp_path, busybox.diff_ids[0], digest=sha256(blob),
                      progress=seen.append)
    assert seen == sorted(seen) and len(seen) > 2
    assert seen[-1] == r.bytes_read == len(blob)


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_corrupt_layer_is_refused_and_leaves_nothing(tmp_path: Path,
                                                     compression: Compression) -> None:
    layer = layer_tar([Entry("a", data=b"A" * 5000), Entry("b", data=b"B" * 100)])
    blob = bytearray(compress(layer, compression))
    blob[len(blob) // 2] ^= 0x10
    with pytest.raises(ImageError, match=f"layer {sha256(layer)}: ") as err:
        extract_layer(io.BytesIO(bytes(blob)), tmp_path, sha256(layer))
    if compression == "none":
        assert f"diff_id mismatch: the tar stream hashes to {sha256(bytes(blob))}" in str(
            err.value)
    assert store_leftovers(tmp_path) == []


def test_wrong_diff_id_and_wrong_blob_digest(tmp_path: Path) -> None:
    layer = layer_tar([Entry("a", data=b"a")])
    blob = compress(layer, "gzip")
    other = sha256(b"something else")
    with pytest.raises(ImageError, match=f"layer {other}: diff_id mismatch: the tar stream "
                                         f"hashes to {sha256(layer)}"):
        extract_layer(io.BytesIO(blob), tmp_path, other, digest=sha256(blob))
    with pytest.raises(ImageError, match=f"blob digest mismatch: expected {other}, "
                                         f"got {sha256(blob)}"):
        extract_layer(io.BytesIO(blob), tmp_path, sha256(layer), digest=other)
    assert store_leftovers(tmp_path) == []


def test_unsupported_compression_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="xz-compressed layers are not supported"):
        extract_layer(io.BytesIO(b"\xfd7zXZ\x00" + b"\0" * 100), tmp_path, sha256(b"x"))
    with pytest.raises(ImageError, match="corrupt gzip tar stream"):
        extract_layer(io.BytesIO(b"\x1f\x8b" + b"garbage" * 10), tmp_path, sha256(b"x"))
    assert store_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- tar-slip


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    """A directory outside the store that every malicious layer aims at; checked untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret\n")
    before = tree(tmp_path)
    yield outside
    after = {k: v for k, v in tree(tmp_path).items() if not k.startswith("store")}
    assert after == {k: v for k, v in before.items() if not k.startswith("store")}
    assert (outside / "secret").read_bytes() == b"secret\n"
    assert (outside / "secret").stat().st_nlink == 1


@pytest.mark.parametrize("kind", MALICIOUS_KINDS)
@pytest.mark.parametrize("privileged", [True, False])
def test_tar_slip_is_refused(tmp_path: Path, sentinel: Path, kind: str,
                             privileged: bool) -> None:
    if privileged and not IS_ROOT:
        pytest.skip("needs root")
    layer, bad = malicious_layer(kind, str(sentinel))
    store = tmp_path / "store"
    with pytest.raises(ImageError) as err:
        extract(store, layer, privileged=privileged)
    assert repr(bad) in str(err.value), str(err.value)
    assert store_leftovers(store) == []
    assert not list(Path("/").glob("evil*"))


def test_entry_through_a_symlink_is_named(tmp_path: Path, sentinel: Path) -> None:
    layer, _ = malicious_layer("symlink-parent-relative", str(sentinel))
    with pytest.raises(ImageError, match=r"entry 'd/link/evil' goes through the symlink "
                                         r"'d/link'"):
        extract(tmp_path / "store", layer)


def test_symlinks_may_point_anywhere(tmp_path: Path) -> None:
    layer = layer_tar([Entry("etc", "dir"), Entry("abs", "symlink", target="/etc/passwd"),
                       Entry("up", "symlink", target="../../../../.."),
                       Entry("etc/mtab", "symlink", target="/proc/self/mounts"),
                       Entry("hl", "hardlink", target="abs")])
    r = extract(tmp_path, layer)
    assert os.readlink(r.path / "abs") == "/etc/passwd"
    assert os.readlink(r.path / "up") == "../../../../.."
    assert os.readlink(r.path / "etc/mtab") == "/proc/self/mounts"
    # A hard link to a symlink links the symlink itself, it does not follow it.
    assert (r.path / "hl").lstat().st_ino == (r.path / "abs").lstat().st_ino


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    layer = layer_tar([
        Entry("x", data=b"file"), Entry("x", "dir"), Entry("x/inner", data=b"i"),
        Entry("y", "dir"), Entry("y/z", data=b"z"), Entry("y", "symlink", target="/etc"),
        Entry("ro", "dir", mode=0o555), Entry("ro/child", data=b"c", mode=0o444),
        Entry("implicit/deep/file", data=b"d"),
    ])
    r = extract(tmp_path, layer, privileged=False)
    assert (r.path / "x/inner").read_bytes() == b"i"
    assert os.readlink(r.path / "y") == "/etc"
    assert stat.S_IMODE((r.path / "ro").stat().st_mode) == 0o555
    assert (r.path / "ro/child").read_bytes() == b"c"
    assert stat.S_IMODE((r.path / "implicit/deep").stat().st_mode) == 0o755


def test_hardlink_to_missing_target_is_refused(tmp_path: Path) -> None:
    layer = layer_tar([Entry("h", "hardlink", target="nowhere/file")])
    with pytest.raises(ImageError, match=r"hard link 'h' -> 'nowhere/file': target does not "
                                         "exist"):
        extract(tmp_path, layer)


# --------------------------------------------------------------------------- privileges


SPECIAL = [
    Entry("dev", "dir"),
    Entry("dev/null", "char", mode=0o666, major=1, minor=3),
    Entry("dev/loop0", "block", mode=0o660, major=7, minor=0, gid=6),
    Entry("dev/gone", "char", mode=0o600, major=0, minor=0),
    Entry("dev/fifo", "fifo", mode=0o620),
    Entry("home", "dir"), Entry("home/u", "dir", uid=1000, gid=1000, mode=0o750),
    Entry("home/u/f", data=b"mine", uid=1000, gid=1000, mode=0o640),
    Entry("bin", "dir"),
    Entry("bin/suid", data=b"#!", mode=0o4755),
    Entry("bin/sgid", data=b"#!", mode=0o2755, gid=50),
    Entry("bin/ping", data=b"ping", mode=0o755,
          xattrs={"security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00"
                                         b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}),
    Entry("bin/tagged", data=b"t", xattrs={"user.note": b"hello", "trusted.mark": b"y"}),
    Entry("bin/link", "symlink", target="/nowhere", uid=1000, gid=1000),
    Entry("bin/null-link", "hardlink", target="dev/null"),
    Entry("ro", "dir", mode=0o555), Entry("ro/sub", "dir", mode=0o500),
    Entry("ro/sub/f", data=b"f", mode=0o400),
]
_TYPE = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
         "fifo": stat.S_IFIFO, "char": stat.S_IFCHR, "block": stat.S_IFBLK}


def special_layer() -> bytes:
    return layer_tar(SPECIAL)


def assert_nothing_lost(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Every entry's type, owner, mode, device numbers and xattrs are either on disk or in the
    sidecar."""
    for e in SPECIAL:
        if e.kind == "hardlink":
            continue
        rec = entries.get(e.path)
        if rec is not None:
            assert (rec["type"], rec["uid"], rec["gid"], rec["mode"]) == (
                e.kind, e.uid, e.gid, e.mode if e.mode is not None else rec["mode"]), e.path
            if e.kind in ("char", "block"):
                assert (rec["devmajor"], rec["devminor"]) == (e.major, e.minor)
        recorded_x = (rec or {}).get("xattrs", {})
        for key, value in e.xattrs.items():
            if key not in recorded_x:
                assert os.getxattr(root / e.path, key) == value, (e.path, key)
            else:
                assert base64.b64decode(recorded_x[key]) == value
        if rec is not None and ("mknod" in rec["missing"] or "chown" in rec["missing"]):
            continue
        st = (root / e.path).lstat()
        assert stat.S_IFMT(st.st_mode) == _TYPE[e.kind], e.path
        assert (st.st_uid, st.st_gid) == (e.uid, e.gid), e.path
        if e.mode is not None and e.kind != "symlink":
            assert stat.S_IMODE(st.st_mode) == e.mode, e.path
        if e.kind in ("char", "block"):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (e.major, e.minor)


def check_unprivileged(store: Path, entries: dict[str, dict[str, Any]], root: Path) -> None:
    """What an unprivileged extraction must have created and recorded."""
    null = entries["dev/null"]
    assert null["type"] == "char" and (null["devmajor"], null["devminor"]) == (1, 3)
    assert null["mode"] == 0o666 and "mknod" in null["missing"]
    assert entries["dev/loop0"]["type"] == "block" and entries["dev/loop0"]["gid"] == 6
    assert entries["bin/null-link"]["devmajor"] == 1
    assert not (root / "dev/null").exists() and not (root / "dev/null").is_symlink()
    # A 0/0 character device is the overlay whiteout: it becomes the OCI whiteout file.
    assert "mknod" in entries["dev/gone"]["missing"]
    assert (root / "dev/.wh.gone").is_file()
    assert entries["home/u/f"]["uid"] == 1000 and "chown" in entries["home/u/f"]["missing"]
    assert entries["home/u/f"]["mode"] == 0o640
    assert entries["home/u"]["type"] == "dir" and entries["home/u"]["mode"] == 0o750
    assert_nothing_lost(root, entries)
    assert base64.b64decode(entries["bin/tagged"]["xattrs"]["trusted.mark"]) == b"y"
    assert "security.capability" in entries["bin/ping"]["xattrs"]
    assert "user.note" not in entries["bin/tagged"]["xattrs"]
    assert os.getxattr(root / "bin/tagged", "user.note") == b"hello"
    assert stat.S_ISFIFO((root / "dev/fifo").lstat().st_mode)
    assert stat.S_IMODE((root / "dev/fifo").lstat().st_mode) == 0o620
    assert (root / "home/u/f").read_bytes() == b"mine"
    assert meta_path(store, sha256(special_layer())).is_file()


def test_unprivileged_flag_records_what_it_skips(tmp_path: Path) -> None:
    r = extract(tmp_path, special_layer(), privileged=False)
    meta = read_meta(tmp_path, sha256(special_layer()))
    assert meta["privileged"] is False and r.recorded == len(meta["entries"])
    check_unprivileged(tmp_path, meta["entries"], r.path)
    if IS_ROOT:  # nothing was chowned although we could have
        assert (r.path / "home/u/f").stat().st_uid == 0


@pytest.mark.skipif(not IS_ROOT, reason="needs root to drop to uid 65534")
def test_really_unprivileged_child_records_in_the_sidecar() -> None:
    base = Path(tempfile.mkdtemp(prefix="mountctl-unpriv-"))
    try:
        os.chmod(base, 0o755)
        store = base / "store"
        store.mkdir()
        os.chown(store, 65534, 65534)
        status = run_as(65534, lambda: extract(store, special_layer()))
        assert status == 0, f"child failed: {status}"
        root = layer_path(store, sha256(special_layer()))
        meta = read_meta(store, sha256(special_layer()))
        assert meta["privileged"] is False
        check_unprivileged(store, meta["entries"], root)
        assert (root / "home/u/f").stat().st_uid == 65534
        assert stat.S_IMODE((root / "ro/sub").stat().st_mode) == 0o500
        # The unprivileged owner can remove its read-only directories again.
        assert run_as(65534, lambda: remove_tree(root)) == 0
        assert not root.exists()
    finally:
        import shutil
        shutil.rmtree(base)


def run_as(uid: int, fn: Callable[[], object]) -> int:
    """Run `fn` in a forked child after dropping to `uid`/`uid`; its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()
            code = 0
        except BaseException as e:
            os.write(2, f"child: {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_privileged_extraction_applies_everything(tmp_path: Path) -> None:
    r = extract(tmp_path, special_layer(), privileged=True)
    root = r.path
    st = (root / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_ISBLK((root / "dev/loop0").lstat().st_mode)
    assert (root / "dev/loop0").lstat().st_gid == 6
    gone = (root / "dev/gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert not (root / "dev/.wh.gone").exists()
    assert (root / "bin/null-link").lstat().st_ino == st.st_ino
    f = (root / "home/u/f").stat()
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 1000, 0o640)
    assert stat.S_IMODE((root / "bin/suid").stat().st_mode) == 0o4755
    assert os.getxattr(root / "bin/tagged", "trusted.mark") == b"y"
    assert os.getxattr(root / "bin/ping", "security.capability")[:4] == b"\x01\x00\x00\x02"
    entries = read_meta(tmp_path, sha256(special_layer()))["entries"]
    assert entries == {}
    assert_nothing_lost(root, entries)
