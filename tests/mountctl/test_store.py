"""mountctl.store: import, list, resolve, inspect, tag, remove and garbage-collect images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mountctl.image import ImageError
from mountctl.store import (
    ImageInUseError,
    ImageNotFoundError,
    Store,
    StoreError,
    default_root,
    resolve_root,
)
from tests.helpers.images import (
    FORMATS,
    Entry,
    Format,
    Image,
    docker_archive_files,
    layer_tar,
    make_image,
    write_image,
    write_tar,
)
from tests.mountctl.conftest import ArchiveFactory


def layer_dirs(store: Store) -> set[str]:
    return {p.name for p in store.layers_dir.iterdir() if not p.name.endswith(".json")}


def add_container(store: Store, cid: str, image_id: str) -> Path:
    d = store.containers_dir / cid
    d.mkdir(parents=True)
    (d / "container.json").write_text(json.dumps({"id": cid, "image_id": image_id}))
    return d


def variant(busybox: Image, tag: str) -> Image:
    """Shares layers 1 and 2 with busybox; its own layer 3 and config."""
    top = layer_tar([Entry("data", "dir"), Entry("data/variant.txt", data=tag.encode())])
    return make_image([*busybox.layers[:2], top], repo_tags=(tag,), user="0")


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_list_inspect_resolve(tmp_path: Path, archive: ArchiveFactory, busybox: Image,
                                     fmt: Format) -> None:
    store = Store(tmp_path / "root")
    res = store.import_image(archive(fmt, "gzip"))
    rec = res.image
    assert rec.id == busybox.id and rec.names == ("busybox-test:latest",)
    assert list(rec.layers) == busybox.diff_ids
    assert res.extracted == rec.layers and res.reused == ()
    assert (store.images_dir / f"{busybox.id[7:]}.json").is_file()
    assert [r.id for r in store.images()] == [busybox.id]
    assert store.inspect("busybox-test")["config"]["WorkingDir"] == "/data"
    for ref in ("busybox-test", "busybox-test:latest", "docker.io/library/busybox-test",
                busybox.id, busybox.id[7:], busybox.id[7:19], busybox.id[:12]):
        assert store.resolve(ref).id == busybox.id, ref
    with pytest.raises(ImageNotFoundError, match="no such image: busybox-test:other"):
        store.resolve("busybox-test:other")
    lowers = store.lowerdirs("busybox-test")
    assert lowers == [store.layer_path(d) for d in reversed(busybox.diff_ids)]
    assert (lowers[-1] / "bin/busybox").is_file()
    assert (lowers[1] / "data/.wh.remove-me.txt").is_file()
    assert store.layer_meta(busybox.diff_ids[0])["diff_id"] == busybox.diff_ids[0]


def test_shared_layers_are_extracted_once(tmp_path: Path, archive: ArchiveFactory,
                                          busybox: Image) -> None:
    store = Store(tmp_path / "root")
    store.import_image(archive("oci-tar", "zstd"))
    shared = store.layer_path(busybox.diff_ids[0])
    ino, mtime = shared.stat().st_ino, (shared / "bin").stat().st_mtime_ns
    other = variant(busybox, "other:1")
    res = store.import_image(write_image(other, tmp_path / "other.tar", "docker-classic",
                                         "none"))
    assert res.reused == tuple(busybox.diff_ids[:2])
    assert res.extracted == (other.diff_ids[2],)
    assert shared.stat().st_ino == ino and (shared / "bin").stat().st_mtime_ns == mtime
    assert len(layer_dirs(store)) == 4
    # Importing the same image again extracts nothing.
    again = store.import_image(archive("oci-dir", "none"))
    assert again.extracted == () and set(again.reused) == set(busybox.diff_ids)
    assert [r.id for r in store.images()] == [busybox.id, other.id]  # first import time kept


def test_a_layer_listed_twice(tmp_path: Path, busybox: Image) -> None:
    empty = layer_tar([])
    img = make_image([busybox.layers[1], empty, busybox.layers[2], empty],
                     repo_tags=("twice:latest",))
    store = Store(tmp_path / "root")
    calls: list[tuple[int, int]] = []
    res = store.import_image(write_image(img, tmp_path / "t.tar", "oci-tar", "gzip"),
                             progress=lambda d, t: calls.append((d, t)))
    assert res.extracted == tuple(dict.fromkeys(img.diff_ids)) and res.reused == ()
    assert len(layer_dirs(store)) == 3
    assert store.lowerdirs("twice") == [store.layer_path(d) for d in
                                        (img.diff_ids[3], img.diff_ids[2], img.diff_ids[0])]
    assert all(d <= t for d, t in calls) and calls[-1][0] == calls[-1][1]


def test_rmi_refuses_while_a_container_uses_the_image(tmp_path: Path, archive: ArchiveFactory,
                                                       busybox: Image) -> None:
    store = Store(tmp_path / "root")
    store.import_image(archive("docker-oci", "gzip"))
    other = variant(busybox, "other:1")
    store.import_image(write_image(other, tmp_path / "o.tar", "oci-tar", "gzip"))
    cdir = add_container(store, "c0ffee", busybox.id)
    with pytest.raises(ImageInUseError, match=r"busybox-test:latest\) is used by container\(s\)"
                                              r" c0ffee"):
        store.remove_image("busybox-test")
    assert store.resolve("busybox-test").id == busybox.id
    assert len(layer_dirs(store)) == 4
    (cdir / "container.json").unlink()
    res = store.remove_image("busybox-test")
    assert res.deleted and res.layers_removed == (busybox.diff_ids[2],)
    # Layers 1 and 2 are still used by the other image.
    assert layer_dirs(store) == {d[7:] for d in other.diff_ids}
    assert not (store.layers_dir / f"{busybox.diff_ids[2][7:]}.meta.json").exists()
    with pytest.raises(ImageNotFoundError):
        store.resolve("busybox-test")
    add_container(store, "c2", other.id[7:])
    with pytest.raises(ImageInUseError):
        store.remove_image(other.id[:16])
    (store.containers_dir / "c2" / "container.json").unlink()
    assert len(store.remove_image(other.id[:16]).layers_removed) == 3
    assert layer_dirs(store) == set() and store.images() == []


def test_tags_move_and_rmi_of_one_name_only_untags(tmp_path: Path, archive: ArchiveFactory,
                                                   busybox: Image) -> None:
    store = Store(tmp_path / "root")
    store.import_image(archive("oci-dir", "gzip"))
    store.tag("busybox-test", "mine:v1")
    assert store.resolve("mine:v1").names == ("busybox-test:latest", "mine:v1")
    res = store.remove_image("mine:v1")
    assert not res.deleted and res.untagged == ("mine:v1",)
    assert store.resolve("busybox-test").names == ("busybox-test:latest",)
    other = variant(busybox, "busybox-test:latest")
    store.import_image(write_image(other, tmp_path / "o.tar", "docker-oci", "none"))
    assert store.resolve("busybox-test").id == other.id
    assert store.resolve(busybox.id).names == ()
    imported = store.import_image(archive("oci-dir", "gzip"), tags=["again"])
    assert imported.image.names == ("again:latest",)


def test_failed_import_leaves_no_trace(tmp_path: Path, busybox: Image) -> None:
    store = Store(tmp_path / "root")
    files, _ = docker_archive_files(busybox)
    layer_member = json.loads(files["manifest.json"])[0]["Layers"][2]
    data = bytearray(files[layer_member])
    data[600] ^= 0x01  # inside layer 3's first file
    files[layer_member] = bytes(data)
    with pytest.raises(ImageError, match=f"layer {busybox.diff_ids[2]}: diff_id mismatch"):
        store.import_image(write_tar(tmp_path / "bad.tar", files))
    assert store.images() == []
    # The good layers before it may stay (they are verified); gc removes them.
    assert not [p for p in store.layers_dir.iterdir() if p.name.startswith(".tmp")]
    assert busybox.diff_ids[2][7:] not in layer_dirs(store)
    assert len(store.gc()) == 2
    assert layer_dirs(store) == set()


def test_gc_removes_what_killed_imports_left(tmp_path: Path, archive: ArchiveFactory) -> None:
    """A killed import leaves an extraction directory (`.tmp-*`) or a layer's metadata record
    not yet renamed into place (`<record>.<pid>.tmp`, `mountctl.jsonfile`); gc removes both,
    and nothing of the layers images use."""
    store = Store(tmp_path / "root")
    store.import_image(archive("docker-classic", "gzip"))
    kept = sorted(p.name for p in store.layers_dir.iterdir())
    (store.layers_dir / ".tmp-0123456789abcdef-x").mkdir()
    meta = next(p for p in store.layers_dir.iterdir() if p.name.endswith(".meta.json"))
    (store.layers_dir / f"{meta.name}.4242.tmp").write_text("{")
    store.gc()
    assert sorted(p.name for p in store.layers_dir.iterdir()) == kept


def test_import_progress_reaches_the_total(tmp_path: Path, archive: ArchiveFactory) -> None:
    calls: list[tuple[int, int]] = []
    Store(tmp_path / "root").import_image(archive("oci-tar", "gzip"),
                                          progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] > 1_000_000
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_ambiguous_prefix(tmp_path: Path, busybox: Image) -> None:
    store = Store(tmp_path / "root")
    ids = set()
    for i in range(40):  # 40 ids: some pair shares its first hex digit
        img = make_image([busybox.layers[1]], repo_tags=(f"n{i}:latest",), labels={"i": str(i)})
        ids.add(store.import_image(write_image(img, tmp_path / f"{i}.tar", "docker-classic",
                                               "none")).image.id)
    first = [i[7] for i in ids]
    dup = next(c for c in first if first.count(c) > 1)
    with pytest.raises(StoreError, match=f"image id prefix '{dup}' is ambiguous"):
        store.resolve(dup)


def test_unreadable_container_record_blocks_rmi(tmp_path: Path, archive: ArchiveFactory) -> None:
    store = Store(tmp_path / "root")
    store.import_image(archive("oci-dir", "none"))
    d = store.containers_dir / "broken"
    d.mkdir()
    (d / "container.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"broken/container\.json: unreadable container record"):
        store.remove_image("busybox-test")


def test_default_root() -> None:
    assert default_root({"MOUNTCTL_ROOT": "/x"}, euid=0) == Path("/x")
    assert default_root({}, euid=0) == Path("/var/lib/mountctl")
    assert default_root({"XDG_DATA_HOME": "/d", "HOME": "/h"}, euid=1000) == Path("/d/mountctl")
    assert default_root({"HOME": "/h"}, euid=1000) == Path("/h/.local/share/mountctl")
    assert resolve_root("/opt/s") == Path("/opt/s")
    assert resolve_root(None) == default_root(os.environ)


@pytest.mark.podman
def test_podman_reads_our_archives_and_we_read_podmans(tmp_path: Path,
                                                        archive: ArchiveFactory,
                                                        busybox: Image) -> None:
    """Interop both ways, in a private podman storage (vfs) that is deleted afterwards."""
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("needs podman")
    short = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))  # podman: runroot <= 50 chars
    base = [podman, "--root", str(short / "root"), "--runroot", str(short / "run"),
            "--storage-driver", "vfs"]

    def run(*args: str) -> str:
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stderr}"
        return r.stdout

    try:
        run("load", "-i", str(archive("docker-classic", "gzip")))
        run("load", "-i", str(archive("oci-tar", "gzip")))
        assert busybox.id[7:19] in run("images", "--format", "{{.ID}}")
        run("save", "--format", "docker-archive", "-o", str(tmp_path / "d.tar"),
            "busybox-test:latest")
        run("save", "--format", "oci-archive", "-o", str(tmp_path / "o.tar"),
            "busybox-test:latest")
    finally:
        subprocess.run([*base, "system", "reset", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(short, ignore_errors=True)
    store = Store(tmp_path / "root")
    for name in ("d.tar", "o.tar"):
        rec = store.import_image(tmp_path / name).image
        assert rec.id == busybox.id and list(rec.layers) == busybox.diff_ids
        assert any(n.endswith("busybox-test:latest") for n in rec.names)
