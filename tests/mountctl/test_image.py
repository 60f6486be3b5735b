"""mountctl.image: parsing docker-archives and OCI layouts built by tests/helpers/images.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mountctl.image import (
    ImageError,
    detect_compression,
    host_platform,
    load_image,
    normalize_tag,
    open_source,
)
from tests.helpers.images import (
    COMPRESSIONS,
    FORMATS,
    Compression,
    Entry,
    Format,
    Image,
    canonical_json,
    docker_archive_files,
    layer_tar,
    make_image,
    oci_layout_files,
    sha256,
    write_dir,
    write_oci_layout,
    write_tar,
)
from tests.mountctl.conftest import ArchiveFactory


def flip(data: bytes, index: int = -2) -> bytes:
    """`data` with one byte changed."""
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


def small_image(tag: str = "small:latest", text: bytes = b"hi\n") -> Image:
    return make_image([layer_tar([Entry("a.txt", data=text)]),
                       layer_tar([Entry("b.txt", data=b"b\n")])], repo_tags=(tag,))


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_compression_parses(archive: ArchiveFactory, busybox: Image,
                                             fmt: Format, compression: Compression) -> None:
    path = archive(fmt, compression)
    m = load_image(path)
    assert m.id == m.config_digest == busybox.id
    assert m.config == busybox.config
    assert m.repo_tags == ("busybox-test:latest",)
    assert m.format == ("oci-layout" if fmt.startswith("oci") else "docker-archive")
    assert [la.diff_id for la in m.layers] == busybox.diff_ids
    assert {la.compression for la in m.layers} == {compression}
    assert (m.manifest_digest is None) == fmt.startswith("docker")
    cfg = m.config["config"]
    assert cfg["Entrypoint"] == ["/bin/sh", "-c"] and cfg["User"] == "1000:1000"
    assert "GREETING=hello" in cfg["Env"] and cfg["WorkingDir"] == "/data"
    with open_source(path) as src:
        for la, raw in zip(m.layers, busybox.layers, strict=True):
            with src.open(la.member) as f:
                blob = f.read()
            assert len(blob) == la.size
            if la.digest is None:  # compressed layer of a classic docker-archive
                assert fmt == "docker-classic" and compression != "none"
            else:
                assert la.digest == sha256(blob)
            if compression == "none":
                assert blob == raw and la.digest == la.diff_id
            assert la.media_type.startswith("application/vnd.oci.image.layer.v1.tar")


def test_compression_is_detected_by_magic() -> None:
    assert detect_compression(b"\x1f\x8b\x08\x00", "x") == "gzip"
    assert detect_compression(b"\x28\xb5\x2f\xfd\x00", "x") == "zstd"
    assert detect_compression(b"bin/\x00\x00", "x") == "none"
    assert detect_compression(b"", "x") == "none"
    with pytest.raises(ImageError, match="layer L: xz-compressed"):
        detect_compression(b"\xfd7zXZ\x00", "layer L")
    with pytest.raises(ImageError, match="bzip2"):
        detect_compression(b"BZh91AY", "layer L")


def test_media_type_does_not_decide_compression(tmp_path: Path) -> None:
    files = oci_layout_files(small_image(), compression="zstd")
    files = rewrite_manifest(files, lambda m: [la.update(
        mediaType="application/vnd.oci.image.layer.v1.tar+gzip") for la in m["layers"]])
    m = load_image(write_dir(tmp_path / "l", files))
    assert [la.compression for la in m.layers] == ["zstd", "zstd"]
    assert m.layers[0].media_type.endswith("+gzip")


def test_classic_archive_follows_layer_symlinks_inside_the_archive(tmp_path: Path) -> None:
    img = small_image()
    files, links = docker_archive_files(img, link_layers=True)
    m = load_image(write_tar(tmp_path / "a.tar", files, links))
    assert [la.member for la in m.layers] == [f"{d.split(':')[1]}.tar" for d in img.diff_ids]
    assert [la.digest for la in m.layers] == img.diff_ids


def test_archive_symlink_leaving_the_archive_is_refused(tmp_path: Path) -> None:
    files, links = docker_archive_files(small_image())
    first = json.loads(files["manifest.json"])[0]["Layers"][0]
    del files[first]
    links[first] = "../../../etc/passwd"
    with pytest.raises(ImageError, match="leaves the archive"):
        load_image(write_tar(tmp_path / "a.tar", files, links))


def test_manifest_json_names_leaving_the_archive_are_refused(tmp_path: Path) -> None:
    files, _ = docker_archive_files(small_image())
    manifest = json.loads(files["manifest.json"])
    manifest[0]["Layers"][0] = "../outside/layer.tar"
    files["manifest.json"] = canonical_json(manifest)
    with pytest.raises(ImageError, match=r"'\.\./outside/layer\.tar' leaves the archive"):
        load_image(write_tar(tmp_path / "a.tar", files))


# --------------------------------------------------------------------------- corruption


def rewrite_manifest(files: dict[str, bytes], mutate: Callable[[dict[str, Any]], object]
                     ) -> dict[str, bytes]:
    """Apply `mutate` to the (single) image manifest of an OCI layout and re-link it."""
    files = dict(files)
    index = json.loads(files["index.json"])
    desc = index["manifests"][0]
    manifest = json.loads(files[f"blobs/sha256/{desc['digest'].split(':')[1]}"])
    mutate(manifest)
    data = canonical_json(manifest)
    files[f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"] = data
    desc.update(digest=sha256(data), size=len(data))
    files["index.json"] = canonical_json(index)
    return files


def oci_manifest(files: dict[str, bytes]) -> dict[str, Any]:
    index = json.loads(files["index.json"])
    manifest: dict[str, Any] = json.loads(
        files[f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"])
    return manifest


def config_member(files: dict[str, bytes], fmt: Format) -> str:
    if fmt.startswith("docker"):
        return str(json.loads(files["manifest.json"])[0]["Config"])
    return f"blobs/sha256/{oci_manifest(files)['config']['digest'][7:]}"


def files_of(img: Image, fmt: Format) -> dict[str, bytes]:
    if fmt.startswith("docker"):
        return docker_archive_files(img, form="classic" if fmt == "docker-classic" else "oci")[0]
    return oci_layout_files(img, compression="gzip")


def write_as(files: dict[str, bytes], fmt: Format, dest: Path) -> Path:
    return write_dir(dest, files) if fmt == "oci-dir" else write_tar(dest, files)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_config_is_detected(tmp_path: Path, fmt: Format) -> None:
    img = small_image()
    files = files_of(img, fmt)
    name = config_member(files, fmt)
    files[name] = flip(files[name])
    with pytest.raises(ImageError, match="digest mismatch") as err:
        load_image(write_as(files, fmt, tmp_path / "img"))
    assert name in str(err.value) and img.id in str(err.value)


@pytest.mark.parametrize("fmt", ["oci-dir", "oci-tar"])
def test_corrupt_manifest_is_detected(tmp_path: Path, fmt: Format) -> None:
    files = oci_layout_files(small_image())
    digest = json.loads(files["index.json"])["manifests"][0]["digest"]
    name = f"blobs/sha256/{digest[7:]}"
    files[name] = flip(files[name], 5)
    with pytest.raises(ImageError, match=f"manifest {name}: digest mismatch: expected {digest}"):
        load_image(write_as(files, fmt, tmp_path / "img"))


def test_descriptor_size_mismatch_is_detected(tmp_path: Path) -> None:
    files = rewrite_manifest(oci_layout_files(small_image()),
                             lambda m: m["layers"][1].update(size=m["layers"][1]["size"] + 1))
    with pytest.raises(ImageError, match=r"layer sha256:[0-9a-f]{64}: size \d+, descriptor says"):
        load_image(write_dir(tmp_path / "l", files))


def test_config_size_must_match_its_descriptor(tmp_path: Path) -> None:
    files = rewrite_manifest(oci_layout_files(small_image()),
                             lambda m: m["config"].update(size=m["config"]["size"] - 1))
    with pytest.raises(ImageError, match=r"config blobs/sha256/[0-9a-f]{64}: size \d+, "
                                         "descriptor says"):
        load_image(write_dir(tmp_path / "l", files))


def test_attestation_manifests_are_not_images(tmp_path: Path) -> None:
    files = oci_layout_files(small_image())
    index = json.loads(files["index.json"])
    index["manifests"][0].pop("platform")
    index["manifests"].append({**index["manifests"][0], "annotations": {
        "vnd.docker.reference.type": "attestation-manifest"}})
    files["index.json"] = canonical_json(index)
    assert load_image(write_dir(tmp_path / "l", files)).id == small_image().id


def test_missing_layer_blob_is_named(tmp_path: Path) -> None:
    files = oci_layout_files(small_image())
    manifest = oci_manifest(files)
    missing = f"blobs/sha256/{manifest['layers'][1]['digest'][7:]}"
    del files[missing]
    with pytest.raises(ImageError, match=f"missing layer blob {missing}"):
        load_image(write_dir(tmp_path / "l", files))


@pytest.mark.parametrize("fmt", FORMATS)
def test_diff_id_count_must_match_layers(tmp_path: Path, fmt: Format) -> None:
    img = small_image()
    cfg = json.loads(canonical_json(img.config))
    cfg["rootfs"]["diff_ids"].append(sha256(b"extra"))
    bad = Image(img.layers, cfg, img.repo_tags)
    with pytest.raises(ImageError, match=r"lists 3 diff_ids but .* lists 2 layers"):
        load_image(write_as(files_of(bad, fmt), fmt, tmp_path / "img"))


def test_config_without_rootfs_is_not_an_image(tmp_path: Path) -> None:
    img = small_image()
    bad = Image(img.layers, {"architecture": "amd64", "os": "linux"}, img.repo_tags)
    with pytest.raises(ImageError, match=f"config {bad.id}: no rootfs"):
        load_image(write_as(files_of(bad, "oci-dir"), "oci-dir", tmp_path / "img"))


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match="junk: not a readable tar archive"):
        load_image(tmp_path / "junk")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="neither a docker-archive"):
        load_image(tmp_path / "empty")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope")
    files = oci_layout_files(small_image())
    files["oci-layout"] = canonical_json({"imageLayoutVersion": "2.0.0"})
    with pytest.raises(ImageError, match="unsupported imageLayoutVersion"):
        load_image(write_dir(tmp_path / "v2", files))


# --------------------------------------------------------------------------- choosing an image


def test_nested_index_picks_the_host_platform(tmp_path: Path) -> None:
    img = small_image("multi:v1")
    path = write_oci_layout(img, tmp_path / "l", nested_index=True)
    m = load_image(path)
    assert m.id == img.id
    assert m.config["architecture"] == host_platform().split("/")[1]
    assert m.repo_tags == ("multi:v1",)
    other = "linux/s390x" if host_platform() != "linux/s390x" else "linux/riscv64"
    m2 = load_image(path, platform=other)
    assert m2.config["architecture"] == other.split("/")[1] and m2.id != img.id
    assert m2.layers == m.layers
    with pytest.raises(ImageError, match=r"no image for platform linux/mips64 \(has: "):
        load_image(path, platform="linux/mips64")


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_images_need_a_ref(tmp_path: Path, fmt: Format) -> None:
    a, b = small_image("one:latest", b"1\n"), small_image("two:v2", b"2\n")
    if fmt.startswith("docker"):
        files = docker_archive_files([a, b], form="classic" if fmt == "docker-classic"
                                     else "oci")[0]
    else:
        files = oci_layout_files([a, b])
    path = write_as(files, fmt, tmp_path / "img")
    with pytest.raises(ImageError, match="holds 2 images; choose one"):
        load_image(path)
    assert load_image(path, ref="one").id == a.id
    assert load_image(path, ref="two:v2").id == b.id
    assert load_image(path, ref="two:v2").repo_tags == ("two:v2",)
    with pytest.raises(ImageError, match="three"):
        load_image(path, ref="three")


def test_normalize_tag() -> None:
    assert normalize_tag("busybox") == "busybox:latest"
    assert normalize_tag("busybox:1.36") == "busybox:1.36"
    assert normalize_tag("localhost:5000/x") == "localhost:5000/x:latest"
    assert normalize_tag("localhost:5000/x:v1") == "localhost:5000/x:v1"
