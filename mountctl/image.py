"""Image archives: `docker save` archives and OCI image layouts, parsed into an ImageManifest.

Owns: finding one image's config and layer blobs in
  - a docker-archive, classic form (`manifest.json`, `<id>/layer.tar`, `<hex>.json`) or the newer
    form (Docker >= 25) whose `manifest.json` points into `blobs/sha256/`;
  - an OCI image layout, as a directory or a tar (`oci-layout`, `index.json` -> [nested index ->]
    image manifest -> config + layers).
It reads the JSON documents (index, manifests, config) and the first bytes of each layer blob (to
tell its compression by magic bytes). It never extracts anything: that is layers.py.

Invariants:
  - every JSON blob is checked against its digest (and its descriptor's size) before it is parsed;
    a blob whose file name is its digest (`blobs/sha256/<hex>`, `<hex>.json`) is checked too;
  - a returned ImageManifest is consistent: one LayerRef per `rootfs.diff_ids` entry, in order
    (bottom layer first), and `config_digest` is the sha256 of the config bytes, i.e. the image id;
  - names inside an archive are normalized and never leave it (no absolute path, no `..`), links
    inside a tar archive are followed only to other members of the same archive.
Layer blobs are verified while they are streamed: layers.extract_layer hashes the compressed
stream (against LayerRef.digest) and the uncompressed tar (against LayerRef.diff_id) in one pass.
Every error is an ImageError with a one-line message naming the offending file or digest.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from pathlib import Path

from mountctl.names import is_hex
from unionfs.tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing and tarfile stay out of `mountctl run`'s start-up)
    import tarfile
    from typing import IO, Any, Literal

    Compression = Literal["none", "gzip", "zstd"]
    ImageFormat = Literal["docker-archive", "oci-layout"]

MAX_JSON = 32 << 20
"""Largest index / manifest / config we agree to read into memory."""

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CONTAINERD_NAME = "io.containerd.image.name"

_HEX_LEN = {"sha256": 64, "sha512": 128}
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "armv6l": "arm", "i686": "386", "i386": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


class ImageError(Exception):
    """An image archive, manifest, config or layer is malformed, corrupt or unsafe."""


class LayerRef(NamedTuple):
    """One layer blob of an image, bottom layer first in ImageManifest.layers."""

    digest: str | None
    """Digest of the blob as stored (compressed). None only for a compressed layer of a classic
    docker-archive, whose member name carries no digest (the diff_id is still verified)."""
    diff_id: str
    """sha256 of the uncompressed tar stream, from the config's rootfs.diff_ids."""
    media_type: str
    compression: Compression
    """Detected from the blob's magic bytes, not from its media type or name."""
    member: str
    """Where to read it: a member name of the archive tar, or a path relative to the layout dir."""
    size: int
    """Size in bytes of the stored (compressed) blob."""


class ImageManifest(NamedTuple):
    source: Path
    format: ImageFormat
    config: dict[str, Any]
    """The decoded image config (treat as read-only)."""
    config_digest: str
    layers: tuple[LayerRef, ...]
    repo_tags: tuple[str, ...]
    manifest_digest: str | None
    """Digest of the image manifest (OCI layouts); None for docker-archive manifest.json."""

    @property
    def id(self) -> str:
        """The image id: the digest of its config."""
        return self.config_digest


# --------------------------------------------------------------------------- digests and names


def parse_digest(digest: object, what: str) -> tuple[str, str]:
    """Split `alg:hex` after checking it; `what` names the offender in the error."""
    if not isinstance(digest, str) or ":" not in digest:
        raise ImageError(f"{what}: invalid digest {digest!r}")
    alg, hexpart = digest.split(":", 1)
    n = _HEX_LEN.get(alg)
    if n is None:
        raise ImageError(f"{what}: unsupported digest algorithm in {digest!r}")
    if len(hexpart) != n or not is_hex(hexpart):
        raise ImageError(f"{what}: invalid digest {digest!r}")
    return alg, hexpart


def compute_digest(data: bytes, alg: str = "sha256") -> str:
    import hashlib  # (only imports need it: it loads OpenSSL's libcrypto)
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


def _verify(data: bytes, digest: str, what: str) -> None:
    alg, _ = parse_digest(digest, what)
    got = compute_digest(data, alg)
    if got != digest:
        raise ImageError(f"{what}: digest mismatch: expected {digest}, got {got}")


def _digest_from_name(name: str) -> str | None:
    """`blobs/sha256/<hex>` or `<hex>.json` -> `sha256:<hex>`; None if the name carries none."""
    m = re.search(r"(?:^|/)blobs/(sha256|sha512)/([0-9a-f]+)$", name)
    if m and len(m.group(2)) == _HEX_LEN[m.group(1)]:
        return f"{m.group(1)}:{m.group(2)}"
    m = re.search(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$", name)
    return f"sha256:{m.group(1)}" if m else None


def _blob_name(digest: str, what: str) -> str:
    alg, hexpart = parse_digest(digest, what)
    return f"blobs/{alg}/{hexpart}"


def detect_compression(head: bytes, what: str) -> Compression:
    """Compression of a layer blob from its first bytes (at least 6 unless the blob is shorter)."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if kind == "gzip":
                return "gzip"
            if kind == "zstd":
                return "zstd"
            raise ImageError(f"{what}: {kind}-compressed layers are not supported")
    return "none"


def normalize_member(name: str, what: str) -> str:
    """A member name normalized (no `./`, no `//`); refuse absolute names and `..`."""
    if not isinstance(name, str) or not name:
        raise ImageError(f"{what}: invalid file name {name!r}")
    if name.startswith("/"):
        raise ImageError(f"{what}: absolute file name {name!r}")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise ImageError(f"{what}: file name {name!r} leaves the archive")
    return norm


def host_platform() -> str:
    """`linux/<goarch>` of this machine, as OCI platforms spell it."""
    machine = os.uname().machine.lower()
    return f"linux/{_GOARCH.get(machine, machine)}"


def _parse_platform(spec: str) -> tuple[str, str, str | None]:
    parts = spec.split("/")
    if len(parts) == 1:
        return "linux", parts[0], None
    if len(parts) in (2, 3) and all(parts):
        return parts[0], parts[1], parts[2] if len(parts) == 3 else None
    raise ImageError(f"invalid platform {spec!r} (expected os/arch[/variant])")


# --------------------------------------------------------------------------- sources


class ImageSource:
    """An open image archive (tar) or layout directory: read-only access to named members."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resolve(self, name: str) -> str:
        """The normalized name of the regular member that `name` designates (links followed)."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        try:
            self.resolve(name)
        except ImageError:
            return False
        return True

    def size(self, name: str) -> int:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        """A binary stream of member `name`; the caller closes it."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, name: str, limit: int = MAX_JSON) -> bytes:
        size = self.size(name)
        if size > limit:
            raise ImageError(f"{self.path}: {name} is too large ({size} bytes)")
        with self.open(name) as f:
            return f.read()

    def head(self, name: str, n: int = 8) -> bytes:
        with self.open(name) as f:
            return f.read(n)


class _DirSource(ImageSource):
    def _file(self, name: str) -> Path:
        return self.path / normalize_member(name, str(self.path))

    def resolve(self, name: str) -> str:
        if not self._file(name).is_file():
            raise ImageError(f"{self.path}: missing {name}")
        return normalize_member(name, str(self.path))

    def size(self, name: str) -> int:
        try:
            st = self._file(name).stat()
        except OSError as e:
            raise ImageError(f"{self.path}: missing {name}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{self.path}: {name} is not a regular file")
        return st.st_size

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._file(name), "rb")
        except OSError as e:
            raise ImageError(f"{self.path}: cannot open {name}: {e.strerror}") from None


class _TarSource(ImageSource):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import tarfile

        try:
            self._tar = tarfile.open(path, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ImageError(f"{path}: not a readable tar archive: {e}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            try:
                self._members[normalize_member(m.name, str(path))] = m
            except ImageError:
                continue  # a member we can never be asked for

    def _member(self, name: str) -> tarfile.TarInfo:
        where = str(self.path)
        cur = normalize_member(name, where)
        for _ in range(16):
            m = self._members.get(cur)
            if m is None:
                raise ImageError(f"{where}: missing {cur}" + (f" (from {name})" if cur != name
                                                                  else ""))
            if m.issym():
                cur = normalize_member(posixpath.join(posixpath.dirname(cur), m.linkname), where)
            elif m.islnk():
                cur = normalize_member(m.linkname, where)
            elif m.isreg():
                return m
            else:
                raise ImageError(f"{where}: {cur} is not a regular file")
        raise ImageError(f"{where}: too many links resolving {name}")

    def resolve(self, name: str) -> str:
        return normalize_member(self._member(name).name, str(self.path))

    def size(self, name: str) -> int:
        return self._member(name).size

    def open(self, name: str) -> IO[bytes]:
        f = self._tar.extractfile(self._member(name))
        if f is None:  # pragma: no cover - _member only returns regular members
            raise ImageError(f"{self.path}: cannot read {name}")
        return f

    def close(self) -> None:
        self._tar.close()


def open_source(path: str | os.PathLike[str]) -> ImageSource:
    """Open an image archive (docker-archive or OCI layout tar) or an OCI layout directory."""
    p = Path(path)
    if p.is_dir():
        return _DirSource(p)
    if not p.exists():
        raise ImageError(f"{p}: no such file or directory")
    return _TarSource(p)


# --------------------------------------------------------------------------- parsing


def _load_json(src: ImageSource, name: str, what: str, digest: str | None = None,
               size: int | None = None) -> tuple[Any, bytes]:
    """Read, size-check, digest-check and decode one JSON member."""
    if not src.exists(name):
        raise ImageError(f"{src.path}: missing {name} ({what})")
    data = src.read(name)
    if size is not None and len(data) != size:
        raise ImageError(f"{src.path}: {what} {name}: size {len(data)}, descriptor says {size}")
    if digest is not None:
        _verify(data, digest, f"{src.path}: {what} {name}")
    try:
        return json.loads(data), data
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{src.path}: {what} {name} is not valid JSON: {e}") from None


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageError(f"{what}: expected a JSON object")
    return value


def _descriptor(value: Any, what: str) -> tuple[str, int, str]:
    d = _obj(value, what)
    digest = d.get("digest")
    parse_digest(digest, what)
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: descriptor {digest} has an invalid size {size!r}")
    media_type = d.get("mediaType", "")
    if not isinstance(media_type, str):
        raise ImageError(f"{what}: descriptor {digest} has an invalid mediaType")
    return str(digest), size, media_type


def _diff_ids(config: dict[str, Any], what: str) -> list[str]:
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError(f"{what}: no rootfs of type 'layers' (not a container image config?)")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list):
        raise ImageError(f"{what}: rootfs.diff_ids is not a list")
    for d in ids:
        alg, _ = parse_digest(d, f"{what}: rootfs.diff_ids")
        if alg != "sha256":
            raise ImageError(f"{what}: diff_id {d} is not sha256")
    return [str(d) for d in ids]


def _layer_ref(src: ImageSource, member: str, digest: str | None, diff_id: str,
               media_type: str, what: str) -> LayerRef:
    if not src.exists(member):
        raise ImageError(f"{src.path}: missing layer blob {member} ({what})")
    compression = detect_compression(src.head(member), f"{src.path}: layer {member}")
    if digest is None and compression == "none":
        digest = diff_id  # an uncompressed blob is its own diff
    if not media_type:
        media_type = MT_OCI_LAYER + ("" if compression == "none" else f"+{compression}")
    return LayerRef(digest=digest, diff_id=diff_id, media_type=media_type,
                    compression=compression, member=member, size=src.size(member))


def normalize_tag(ref: str) -> str:
    """`name` -> `name:latest`; `host:5000/name` keeps its port; digests are left alone."""
    if "@" in ref:
        return ref
    slash = ref.rfind("/")
    return ref if ":" in ref[slash + 1:] else f"{ref}:latest"


def short_name(name: str) -> str:
    """A name without the implicit `docker.io/library/` (or `docker.io/`) prefix, to compare."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def same_image_name(a: str, b: str) -> bool:
    """`busybox`, `busybox:latest` and `docker.io/library/busybox:latest` are the same name."""
    return short_name(normalize_tag(a)) == short_name(normalize_tag(b))


def _read_docker(src: ImageSource, ref: str | None) -> ImageManifest:
    where = f"{src.path}: manifest.json"
    entries, _ = _load_json(src, "manifest.json", "docker manifest")
    if not isinstance(entries, list) or not entries:
        raise ImageError(f"{where}: expected a non-empty list of images")
    entries = [_obj(e, where) for e in entries]

    def tags_of(e: dict[str, Any]) -> list[str]:
        tags = e.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ImageError(f"{where}: RepoTags is not a list of strings")
        return tags

    if ref is not None:
        want = normalize_tag(ref)
        chosen = [e for e in entries if any(same_image_name(ref, t) for t in tags_of(e))]
        if not chosen:
            have = sorted(t for e in entries for t in tags_of(e))
            raise ImageError(f"{where}: no image tagged {want} (has: {', '.join(have) or 'none'})")
        entries = chosen[:1]
    if len(entries) > 1:
        have = sorted(t for e in entries for t in tags_of(e))
        raise ImageError(f"{where}: holds {len(entries)} images; choose one by tag "
                         f"(has: {', '.join(have) or 'untagged images'})")
    entry = entries[0]
    cfg_name = entry.get("Config")
    if not isinstance(cfg_name, str):
        raise ImageError(f"{where}: Config is missing")
    cfg_name = normalize_member(cfg_name, where)
    config_raw, cfg_bytes = _load_json(src, cfg_name, "config", _digest_from_name(cfg_name))
    config_digest = compute_digest(cfg_bytes)
    config = _obj(config_raw, f"{src.path}: config {config_digest}")
    diff_ids = _diff_ids(config, f"{src.path}: config {config_digest}")
    names = entry.get("Layers")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ImageError(f"{where}: Layers is not a list of file names")
    if len(names) != len(diff_ids):
        raise ImageError(f"{src.path}: config {config_digest} lists {len(diff_ids)} diff_ids "
                         f"but manifest.json lists {len(names)} layers")
    layers = []
    for name, diff_id in zip(names, diff_ids, strict=True):
        member = src.resolve(normalize_member(name, where))  # links inside the archive
        layers.append(_layer_ref(src, member, _digest_from_name(member), diff_id, "",
                                 f"layer {diff_id}"))
    return ImageManifest(source=src.path, format="docker-archive", config=config,
                         config_digest=config_digest, layers=tuple(layers),
                         repo_tags=tuple(normalize_tag(t) for t in tags_of(entry)),
                         manifest_digest=None)


def _is_attestation(d: dict[str, Any]) -> bool:
    ann = d.get("annotations") or {}
    plat = d.get("platform") or {}
    return (isinstance(ann, dict) and "vnd.docker.reference.type" in ann) or (
        isinstance(plat, dict) and plat.get("os") == "unknown")


def _ref_names(d: dict[str, Any]) -> list[str]:
    ann = d.get("annotations") or {}
    if not isinstance(ann, dict):
        return []
    return [v for k, v in ann.items() if k in (ANN_REF_NAME, ANN_CONTAINERD_NAME)
            and isinstance(v, str)]


def _platform_ok(d: dict[str, Any], want: tuple[str, str, str | None]) -> bool:
    plat = d.get("platform")
    if not isinstance(plat, dict):
        return True
    os_, arch, variant = want
    return (plat.get("os") == os_ and plat.get("architecture") == arch
            and (variant is None or plat.get("variant") in (None, variant)))


def _platform_str(d: dict[str, Any]) -> str:
    plat = d.get("platform")
    if not isinstance(plat, dict):
        return "?"
    return "/".join(str(plat[k]) for k in ("os", "architecture", "variant") if plat.get(k))


def _pick_manifest(src: ImageSource, index: dict[str, Any], where: str, ref: str | None,
                   platform: str | None, depth: int = 0
                   ) -> tuple[dict[str, Any], str, list[str]]:
    """Follow index -> [index ->] manifest.

    Returns (manifest JSON, manifest digest, names annotated on the top-level descriptor)."""
    if depth > 4:
        raise ImageError(f"{where}: indexes nested too deeply")
    descs = index.get("manifests")
    if not isinstance(descs, list):
        raise ImageError(f"{where}: 'manifests' is not a list")
    cands = [_obj(d, where) for d in descs]
    cands = [d for d in cands if not _is_attestation(d)]
    if ref is not None:
        named = [d for d in cands
                 if any(n == ref or same_image_name(n, ref) for n in _ref_names(d))]
        if not named:
            have = sorted({n for d in cands for n in _ref_names(d)})
            raise ImageError(f"{where}: no image named {ref} (has: {', '.join(have) or 'none'})")
        cands = named
    if platform is not None or len(cands) > 1:
        want = _parse_platform(platform or host_platform())
        matching = [d for d in cands if _platform_ok(d, want)]
        if not matching:
            plats = ", ".join(sorted({_platform_str(d) for d in cands}))
            raise ImageError(f"{where}: no image for platform {'/'.join(filter(None, want))} "
                             f"(has: {plats})")
        cands = matching
    if not cands:
        raise ImageError(f"{where}: lists no image manifest")
    if len(cands) > 1:
        have = sorted({n for d in cands for n in _ref_names(d)})
        raise ImageError(f"{where}: holds {len(cands)} images; choose one by name "
                         f"(has: {', '.join(have) or 'unnamed images'})")
    desc = cands[0]
    digest, size, media_type = _descriptor(desc, where)
    name = _blob_name(digest, where)
    doc_raw, _ = _load_json(src, name, "manifest", digest, size)
    doc = _obj(doc_raw, f"{src.path}: manifest {digest}")
    kind = media_type or doc.get("mediaType", "")
    if kind in INDEX_TYPES or (not kind and "manifests" in doc):
        inner, inner_digest, _ = _pick_manifest(src, doc, f"{src.path}: index {digest}", None,
                                                platform, depth + 1)
        return inner, inner_digest, _ref_names(desc)
    if kind and kind not in MANIFEST_TYPES:
        raise ImageError(f"{src.path}: manifest {digest} has unsupported media type {kind}")
    return doc, digest, _ref_names(desc)


def _read_oci(src: ImageSource, ref: str | None, platform: str | None) -> ImageManifest:
    layout_raw, _ = _load_json(src, "oci-layout", "OCI layout marker")
    version = _obj(layout_raw, f"{src.path}: oci-layout").get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{src.path}: oci-layout: unsupported imageLayoutVersion {version!r}")
    index_raw, _ = _load_json(src, "index.json", "OCI index")
    index = _obj(index_raw, f"{src.path}: index.json")
    manifest, manifest_digest, names = _pick_manifest(src, index, f"{src.path}: index.json",
                                                      ref, platform)
    where = f"{src.path}: manifest {manifest_digest}"
    if manifest.get("schemaVersion") != 2:
        raise ImageError(f"{where}: schemaVersion is not 2")
    cdigest, csize, _ = _descriptor(manifest.get("config"), f"{where}: config")
    config_raw, _ = _load_json(src, _blob_name(cdigest, where), "config", cdigest, csize)
    config = _obj(config_raw, f"{src.path}: config {cdigest}")
    diff_ids = _diff_ids(config, f"{src.path}: config {cdigest}")
    descs = manifest.get("layers")
    if not isinstance(descs, list):
        raise ImageError(f"{where}: 'layers' is not a list")
    if len(descs) != len(diff_ids):
        raise ImageError(f"{src.path}: config {cdigest} lists {len(diff_ids)} diff_ids but "
                         f"manifest {manifest_digest} lists {len(descs)} layers")
    layers = []
    for desc, diff_id in zip(descs, diff_ids, strict=True):
        digest, size, media_type = _descriptor(desc, f"{where}: layer")
        if media_type and ("tar" not in media_type or "encrypted" in media_type):
            raise ImageError(f"{where}: layer {digest} has unsupported media type {media_type}")
        layer = _layer_ref(src, _blob_name(digest, where), digest, diff_id, media_type,
                           f"layer {digest}")
        if layer.size != size:
            raise ImageError(f"{src.path}: layer {digest}: size {layer.size}, "
                             f"descriptor says {size}")
        layers.append(layer)
    # A bare tag such as "latest" in ref.name names no repository: it is no repo tag.
    tags = [normalize_tag(n) for n in names if "/" in n or ":" in n]
    return ImageManifest(source=src.path, format="oci-layout", config=config,
                         config_digest=cdigest, layers=tuple(layers),
                         repo_tags=tuple(dict.fromkeys(tags)), manifest_digest=manifest_digest)


def read_image(src: ImageSource, *, ref: str | None = None,
               platform: str | None = None) -> ImageManifest:
    """Parse the image in `src`.

    `ref` picks one image from an archive holding several (a repo tag for docker-archives, a
    ref.name / image.name annotation for OCI layouts). `platform` (`os/arch[/variant]`) picks a
    manifest from a multi-platform index; by default the host's platform when there is a choice.
    A docker-archive's manifest.json wins over an index.json in the same archive.
    """
    if src.exists("manifest.json"):
        return _read_docker(src, ref)
    if src.exists("index.json"):
        return _read_oci(src, ref, platform)
    raise ImageError(f"{src.path}: neither a docker-archive (no manifest.json) nor an OCI "
                     "layout (no index.json)")


def load_image(path: str | os.PathLike[str], *, ref: str | None = None,
               platform: str | None = None) -> ImageManifest:
    """open_source + read_image + close: just the parsed manifest."""
    with open_source(path) as src:
        return read_image(src, ref=ref, platform=platform)

