"""Build tiny, deterministic container images for the tests and the README demo.

Owns: layer tars made from a list of Entry, images made from layers plus a config, and their
on-disk forms: docker-archive (classic `<id>/layer.tar` form and the Docker >= 25 form that
points into `blobs/sha256/`), OCI layout directory and OCI layout tar, each with uncompressed,
gzip or zstd layers. Also malicious layers (tar-slip variants) for the extraction tests.

Invariants: the same arguments give byte-identical archives (fixed mtimes, uid/gid 0 unless an
entry says otherwise, no user/group names, gzip without timestamp, sorted archive members),
so digests are stable. No pytest imports: the README demo runs this as
`python -m tests.helpers.images OUT --format oci-tar --compression zstd`.

The busybox image (from Debian's busybox-static /bin/busybox):
  layer 1: bin/busybox + applet symlinks (bin/sh -> busybox, ...), etc/passwd (root and user
           1000), etc/group, tmp (1777), root, home/user (1000:1000), data/ (hello.txt,
           remove-me.txt, hello-link.txt = hard link to hello.txt), opq/ (old1.txt, sub/old2.txt);
  layer 2: data/.wh.remove-me.txt (whiteout), opq/.wh..wh..opq (opaque) + opq/new.txt,
           data/layer2.txt;
  layer 3 (optional): data/hello.txt rewritten, data/layer3.txt.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"

Format = Literal["docker-classic", "docker-oci", "oci-dir", "oci-tar"]
Compression = Literal["none", "gzip", "zstd"]
FORMATS: tuple[Format, ...] = ("docker-classic", "docker-oci", "oci-dir", "oci-tar")
COMPRESSIONS: tuple[Compression, ...] = ("none", "gzip", "zstd")
Kind = Literal["file", "dir", "symlink", "hardlink", "fifo", "char", "block"]

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

APPLETS = ("sh", "ash", "ls", "cat", "echo", "env", "id", "pwd", "sleep", "test", "[", "true",
           "false", "mkdir", "rm", "rmdir", "touch", "stat", "uname", "whoami", "hostname", "ps",
           "mount", "umount", "grep", "wc", "head", "tail", "cp", "mv", "ln", "chmod", "chown",
           "readlink", "sed", "sort", "date", "df", "find", "printf", "kill", "tr", "cut", "dd",
           "mknod", "mkfifo", "sync", "xargs", "timeout", "sha256sum", "awk", "tee")

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
GROUP = b"root:x:0:\nuser:x:1000:\n"


@dataclass(frozen=True)
class Entry:
    """One tar entry. `target` is the link target of a symlink or hard link."""

    path: str
    kind: Kind = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    target: str = ""
    major: int = 0
    minor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    mtime: int = MTIME


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
          "block": tarfile.BLKTYPE}
_MODES = {"dir": 0o755, "symlink": 0o777, "fifo": 0o644, "char": 0o666, "block": 0o660}


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """An uncompressed PAX tar of `entries`, in the order given (order matters for attacks)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.path)
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode if e.mode is not None else _MODES.get(e.kind, 0o644)
            ti.uid, ti.gid, ti.uname, ti.gname = e.uid, e.gid, "", ""
            ti.mtime = e.mtime
            ti.linkname = e.target
            ti.devmajor, ti.devminor = e.major, e.minor
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                  for k, v in sorted(e.xattrs.items())}
            ti.size = len(e.data) if e.kind == "file" else 0
            tar.addfile(ti, io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def goarch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Image:
    """Uncompressed layer tars (bottom first), the config document, repo tags."""

    layers: tuple[bytes, ...]
    config: dict[str, Any] = field(hash=False)
    repo_tags: tuple[str, ...] = ()

    @property
    def config_bytes(self) -> bytes:
        return canonical_json(self.config)

    @property
    def id(self) -> str:
        return sha256(self.config_bytes)

    @property
    def diff_ids(self) -> list[str]:
        return [sha256(layer) for layer in self.layers]


def make_image(layers: Sequence[bytes], *, repo_tags: Sequence[str] = ("test:latest",),
               env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                                     "/sbin:/bin",),
               entrypoint: Sequence[str] | None = None, cmd: Sequence[str] | None = None,
               working_dir: str = "/", user: str = "", arch: str | None = None,
               labels: Mapping[str, str] | None = None) -> Image:
    cfg: dict[str, Any] = {"Env": list(env), "WorkingDir": working_dir, "User": user}
    if entrypoint is not None:
        cfg["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        cfg["Cmd"] = list(cmd)
    if labels:
        cfg["Labels"] = dict(labels)
    config = {
        "architecture": arch or goarch(), "os": "linux", "created": CREATED, "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
        "history": [{"created": CREATED, "created_by": f"tests.helpers.images layer {i + 1}"}
                    for i in range(len(layers))],
    }
    return Image(tuple(layers), config, tuple(repo_tags))


# --------------------------------------------------------------------------- the busybox image


def busybox_layers(busybox: Path = Path("/bin/busybox"), *, third_layer: bool = True
                   ) -> list[bytes]:
    exe = busybox.read_bytes()
    d: Kind = "dir"
    layer1 = [
        Entry("bin", d), Entry("bin/busybox", data=exe, mode=0o755),
        *(Entry(f"bin/{a}", "symlink", target="busybox") for a in sorted(APPLETS)),
        Entry("data", d), Entry("data/hello.txt", data=b"hello from layer 1\n"),
        Entry("data/hello-link.txt", "hardlink", target="data/hello.txt"),
        Entry("data/remove-me.txt", data=b"whited out by layer 2\n"),
        Entry("dev", d), Entry("etc", d), Entry("etc/group", data=GROUP),
        Entry("etc/passwd", data=PASSWD), Entry("home", d),
        Entry("home/user", d, uid=1000, gid=1000),
        Entry("home/user/.profile", data=b"export PS1='$ '\n", uid=1000, gid=1000),
        Entry("opq", d), Entry("opq/old1.txt", data=b"hidden by the opaque dir\n"),
        Entry("opq/sub", d), Entry("opq/sub/old2.txt", data=b"hidden too\n"),
        Entry("proc", d), Entry("root", d, mode=0o700), Entry("run", d), Entry("sys", d),
        Entry("tmp", d, mode=0o1777), Entry("usr", d), Entry("usr/bin", d),
        Entry("var", d), Entry("var/tmp", d, mode=0o1777),
    ]
    layer2 = [
        Entry("data", d), Entry("data/.wh.remove-me.txt"),
        Entry("data/layer2.txt", data=b"added by layer 2\n"),
        Entry("opq", d), Entry("opq/.wh..wh..opq"), Entry("opq/new.txt", data=b"new in layer 2\n"),
    ]
    layers = [layer_tar(layer1), layer_tar(layer2)]
    if third_layer:
        layers.append(layer_tar([
            Entry("data", d), Entry("data/hello.txt", data=b"hello from layer 3\n"),
            Entry("data/layer3.txt", data=b"added by layer 3\n", mode=0o600)]))
    return layers


def busybox_image(busybox: Path = Path("/bin/busybox"), *,
                  repo_tags: Sequence[str] = ("busybox-test:latest",), third_layer: bool = True,
                  user: str = "1000:1000", entrypoint: Sequence[str] | None = ("/bin/sh", "-c"),
                  cmd: Sequence[str] | None = ('echo "$GREETING from $(id -u):$(id -g) in '
                                               '$(pwd)"',),
                  extra_env: Sequence[str] = ("GREETING=hello",)) -> Image:
    return make_image(
        busybox_layers(busybox, third_layer=third_layer), repo_tags=repo_tags,
        env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *extra_env),
        entrypoint=entrypoint, cmd=cmd, working_dir="/data", user=user,
        labels={"org.opencontainers.image.title": "busybox-test"})


# --------------------------------------------------------------------------- archive writers


def write_tar(dest: Path, files: Mapping[str, bytes],
               symlinks: Mapping[str, str] | None = None) -> Path:
    """A deterministic tar of `files` (+ symlinks), with the directories they need."""
    links = dict(symlinks or {})
    dirs = sorted({str(Path(p).parents[i]) for p in [*files, *links]
                   for i in range(len(Path(p).parents) - 1)})
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in dirs:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(ti)
        for name in sorted([*files, *links]):
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = MTIME, 0o644
            if name in links:
                ti.type, ti.linkname = tarfile.SYMTYPE, links[name]
                tar.addfile(ti)
            else:
                ti.size = len(files[name])
                tar.addfile(ti, io.BytesIO(files[name]))
    return dest


def _as_list(images: Image | Sequence[Image]) -> list[Image]:
    return [images] if isinstance(images, Image) else list(images)


def docker_archive_files(images: Image | Sequence[Image], *, compression: Compression = "none",
                         form: Literal["classic", "oci"] = "classic",
                         link_layers: bool = False) -> tuple[dict[str, bytes], dict[str, str]]:
    """Members of a `docker save` archive: (files, symlinks).

    classic: `<id>/layer.tar`, `<id>/json`, `<id>/VERSION`, `<config hex>.json`, manifest.json,
    repositories; with `link_layers` each layer.tar is a symlink to `../<diff hex>.tar` (as docker
    writes a layer shared by two images). oci: Docker >= 25, manifest.json points into
    blobs/sha256/, plus oci-layout and index.json."""
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    manifest: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    if form == "oci":
        oci_files = oci_layout_files(images, compression=compression)
        files.update(oci_files)
    for img in _as_list(images):
        names: list[str] = []
        if form == "classic":
            cfg_name = f"{_hex(img.id)}.json"
            files[cfg_name] = img.config_bytes
            parent = ""
            for layer in img.layers:
                layer_id = hashlib.sha256(f"{parent} {sha256(layer)}".encode()).hexdigest()
                blob = compress(layer, compression)
                if link_layers:
                    files[f"{_hex(sha256(layer))}.tar"] = blob
                    links[f"{layer_id}/layer.tar"] = f"../{_hex(sha256(layer))}.tar"
                else:
                    files[f"{layer_id}/layer.tar"] = blob
                files[f"{layer_id}/VERSION"] = b"1.0"
                files[f"{layer_id}/json"] = canonical_json(
                    {"id": layer_id, **({"parent": parent} if parent else {})})
                names.append(f"{layer_id}/layer.tar")
                parent = layer_id
            for tag in img.repo_tags:
                repo, _, t = tag.rpartition(":")
                repositories.setdefault(repo, {})[t] = parent
        else:
            cfg_name = f"blobs/sha256/{_hex(img.id)}"
            names = [f"blobs/sha256/{_hex(sha256(compress(layer, compression)))}"
                     for layer in img.layers]
        manifest.append({"Config": cfg_name, "RepoTags": list(img.repo_tags) or None,
                         "Layers": names})
    files["manifest.json"] = canonical_json(manifest)
    if repositories:
        files["repositories"] = canonical_json(repositories)
    return files, links


def write_docker_archive(images: Image | Sequence[Image], dest: Path, *,
                         compression: Compression = "none",
                         form: Literal["classic", "oci"] = "classic",
                         link_layers: bool = False) -> Path:
    files, links = docker_archive_files(images, compression=compression, form=form,
                                        link_layers=link_layers)
    return write_tar(dest, files, links)


def _manifest_for(img: Image, compression: Compression,
                  blobs: dict[str, bytes]) -> tuple[bytes, str]:
    layers = []
    for layer in img.layers:
        blob = compress(layer, compression)
        blobs[f"blobs/sha256/{_hex(sha256(blob))}"] = blob
        suffix = "" if compression == "none" else f"+{compression}"
        layers.append({"mediaType": MT_OCI_LAYER + suffix, "digest": sha256(blob),
                       "size": len(blob)})
    blobs[f"blobs/sha256/{_hex(img.id)}"] = img.config_bytes
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": img.id, "size": len(img.config_bytes)},
        "layers": layers})
    blobs[f"blobs/sha256/{_hex(sha256(manifest))}"] = manifest
    return manifest, sha256(manifest)


def _descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def oci_layout_files(images: Image | Sequence[Image], *, compression: Compression = "gzip",
                     nested_index: bool = False) -> dict[str, bytes]:
    """Members of an OCI image layout.

    With `nested_index`, index.json points to one image index holding the image for the host
    platform, the same image labelled for another architecture (its config says so), and a
    buildx-style attestation manifest; names are annotated on the index.json descriptor."""
    files: dict[str, bytes] = {"oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"})}
    descs = []
    for img in _as_list(images):
        ann: dict[str, str] = {}
        if img.repo_tags:
            ann = {"io.containerd.image.name": img.repo_tags[0],
                   "org.opencontainers.image.ref.name": img.repo_tags[0].rpartition(":")[2]}
        manifest, _ = _manifest_for(img, compression, files)
        plat = {"os": "linux", "architecture": img.config.get("architecture", goarch())}
        if not nested_index:
            descs.append(_descriptor(MT_OCI_MANIFEST, manifest, platform=plat,
                                     **({"annotations": ann} if ann else {})))
            continue
        other_arch = "s390x" if plat["architecture"] != "s390x" else "riscv64"
        other = Image(img.layers, {**img.config, "architecture": other_arch}, img.repo_tags)
        other_manifest, _ = _manifest_for(other, compression, files)
        attest = canonical_json({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                                 "config": {"mediaType": MT_OCI_CONFIG,
                                            "digest": img.id, "size": len(img.config_bytes)},
                                 "layers": []})
        files[f"blobs/sha256/{_hex(sha256(attest))}"] = attest
        inner = canonical_json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [
            _descriptor(MT_OCI_MANIFEST, other_manifest,
                        platform={"os": "linux", "architecture": other_arch}),
            _descriptor(MT_OCI_MANIFEST, manifest, platform=plat),
            _descriptor(MT_OCI_MANIFEST, attest,
                        platform={"os": "unknown", "architecture": "unknown"},
                        annotations={"vnd.docker.reference.type": "attestation-manifest",
                                     "vnd.docker.reference.digest": sha256(manifest)}),
        ]})
        files[f"blobs/sha256/{_hex(sha256(inner))}"] = inner
        descs.append(_descriptor(MT_OCI_INDEX, inner, **({"annotations": ann} if ann else {})))
    files["index.json"] = canonical_json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                                          "manifests": descs})
    return files


def write_oci_layout(images: Image | Sequence[Image], dest: Path, *,
                     compression: Compression = "gzip", as_tar: bool = False,
                     nested_index: bool = False) -> Path:
    files = oci_layout_files(images, compression=compression, nested_index=nested_index)
    return write_tar(dest, files) if as_tar else write_dir(dest, files)


def write_dir(dest: Path, files: Mapping[str, bytes]) -> Path:
    """Write `files` (archive member name -> content) below directory `dest`."""
    for name, data in files.items():
        p = dest / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (MTIME, MTIME))
    return dest


def write_image(images: Image | Sequence[Image], dest: Path, fmt: Format,
                compression: Compression = "gzip") -> Path:
    """Write `images` in format `fmt`; `dest` is a file, or a directory for oci-dir."""
    if fmt == "docker-classic":
        return write_docker_archive(images, dest, compression=compression, form="classic")
    if fmt == "docker-oci":
        return write_docker_archive(images, dest, compression=compression, form="oci")
    return write_oci_layout(images, dest, compression=compression, as_tar=fmt == "oci-tar")


# --------------------------------------------------------------------------- malicious layers

MALICIOUS_KINDS = ("dotdot", "dotdot-nested", "absolute", "symlink-parent",
                   "symlink-parent-relative", "symlink-dir-entry", "hardlink-absolute",
                   "hardlink-dotdot", "hardlink-through-symlink")


def malicious_layer(kind: str, outside: str) -> tuple[bytes, str]:
    """A layer that tries to write into (or link to) the absolute directory `outside`.

    Returns (uncompressed tar, name of the entry an extractor must refuse). `outside` is
    expected to hold a file `secret`. Each layer starts with a harmless file."""
    ok = Entry("ok.txt", data=b"harmless\n")
    up = "../" * 32
    rel = up + outside.lstrip("/")
    entries: list[Entry]
    if kind == "dotdot":
        entries, bad = [Entry("../evil", data=b"x")], "../evil"
    elif kind == "dotdot-nested":
        bad = "a/../../" + rel + "/evil"
        entries = [Entry("a", "dir"), Entry(bad, data=b"x")]
    elif kind == "absolute":
        bad = f"{outside}/evil"
        entries = [Entry(bad, data=b"x")]
    elif kind == "symlink-parent":
        bad = "link/evil"
        entries = [Entry("link", "symlink", target=outside), Entry(bad, data=b"x")]
    elif kind == "symlink-parent-relative":
        bad = "d/link/evil"
        entries = [Entry("d", "dir"), Entry("d/link", "symlink", target=rel),
                   Entry(bad, data=b"x")]
    elif kind == "symlink-dir-entry":
        bad = "link/evil-dir"
        entries = [Entry("link", "symlink", target=outside), Entry(bad, "dir")]
    elif kind == "hardlink-absolute":
        bad = "h"
        entries = [Entry(bad, "hardlink", target=f"{outside}/secret")]
    elif kind == "hardlink-dotdot":
        bad = "h"
        entries = [Entry(bad, "hardlink", target=rel + "/secret")]
    elif kind == "hardlink-through-symlink":
        bad = "h"
        entries = [Entry("s", "symlink", target=outside), Entry(bad, "hardlink", target="s/secret")]
    else:
        raise ValueError(f"unknown malicious kind {kind!r}")
    return layer_tar([ok, *entries]), bad


def malicious_image(kind: str, outside: str, dest: Path, fmt: Format = "docker-classic",
                    compression: Compression = "none") -> tuple[Path, str]:
    """A one-layer image whose layer is malicious_layer(kind); returns (path, bad entry)."""
    layer, bad = malicious_layer(kind, outside)
    img = make_image([layer], repo_tags=(f"evil-{kind}:latest",))
    return write_image(img, dest, fmt, compression), bad


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.images",
                                 description="Write the tiny busybox test image.")
    ap.add_argument("dest", type=Path, help="archive file (or directory for oci-dir)")
    ap.add_argument("--format", choices=FORMATS, default="oci-tar")
    ap.add_argument("--compression", choices=COMPRESSIONS, default="gzip")
    ap.add_argument("--tag", default="busybox-test:latest")
    ap.add_argument("--busybox", type=Path, default=Path("/bin/busybox"))
    args = ap.parse_args(argv)
    img = busybox_image(args.busybox, repo_tags=(args.tag,))
    path = write_image(img, args.dest, args.format, args.compression)
    print(f"{path} {img.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
