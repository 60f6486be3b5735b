"""The image store: imported images, their shared extracted layers, and garbage collection.

Owns the layout under the store root:
  images/<hex>.json                    one record per image (id, names, layer diff_ids, config)
  layers/sha256/<hex>/                 extracted layers, shared by images (owned by layers.py)
  layers/sha256/<hex>.meta.json        their sidecars (layers.py)
  containers/<cid>/container.json      written by the runner; read here only to know which
                                       images are in use (key "image_id" or "image": an id)
  .lock                                flock taken by every change (import, tag, remove, gc)

Invariants:
  - an image id is its config digest (`sha256:<hex>`), the record's file name is that hex;
  - a record is written (tmp + rename) only after all its layers are in the store, and every
    change happens under the store lock, so a record never names a missing layer and garbage
    collection never races an import;
  - a name (`repo:tag`) belongs to at most one image: importing or tagging moves it;
  - an image referenced by a container record is never removed; a layer is removed only when
    no remaining image lists it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from mountctl import layerdirs
from mountctl.image import compute_digest, normalize_tag, open_source, read_image
from mountctl.image import short_name as _short
from mountctl.jsonfile import write_json
from mountctl.names import is_hex, is_hex64
from unionfs.tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing stays out of `mountctl run`'s start-up)
    from typing import Any

ImportProgress = Callable[[int, int], None]
"""Called with (bytes read so far, total bytes) over all layers an import extracts."""



class StoreError(Exception):
    """A store operation cannot be done (the message says why, in one line)."""


class ImageNotFoundError(StoreError):
    pass


class ImageInUseError(StoreError):
    pass


def default_root(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """`$MOUNTCTL_ROOT`, else /var/lib/mountctl for root, else $XDG_DATA_HOME/mountctl
    (~/.local/share/mountctl)."""
    env = os.environ if environ is None else environ
    if env.get("MOUNTCTL_ROOT"):
        return Path(env["MOUNTCTL_ROOT"])
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/lib/mountctl")
    data = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME") or Path.home()) /
                                           ".local" / "share")
    return Path(data) / "mountctl"


def resolve_root(option: str | os.PathLike[str] | None = None) -> Path:
    """The store root for a `--root` option value (None: default_root())."""
    return Path(option) if option else default_root()


class ImageRecord(NamedTuple):
    id: str
    names: tuple[str, ...]
    layers: tuple[str, ...]
    """diff_ids, bottom layer first (OCI order)."""
    config: dict[str, Any]
    imported: float = 0.0
    source: str = ""
    manifest_digest: str | None = None

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "names": list(self.names), "layers": list(self.layers),
                "config": self.config, "imported": self.imported, "source": self.source,
                "manifest_digest": self.manifest_digest}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ImageRecord:
        try:
            return cls(id=str(obj["id"]), names=tuple(str(n) for n in obj["names"]),
                       layers=tuple(str(d) for d in obj["layers"]), config=dict(obj["config"]),
                       imported=float(obj.get("imported", 0.0)), source=str(obj.get("source", "")),
                       manifest_digest=obj.get("manifest_digest"))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: corrupt image record ({e})") from None


class ImportResult(NamedTuple):
    image: ImageRecord
    extracted: tuple[str, ...]
    """diff_ids extracted by this import."""
    reused: tuple[str, ...]
    """diff_ids that were already in the store."""


class RemoveResult(NamedTuple):
    id: str
    untagged: tuple[str, ...]
    deleted: bool
    """False when only a name was removed (the image has other names)."""
    layers_removed: tuple[str, ...]




class Store:
    """The store rooted at `root` (created on first change)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.layers_dir = self.root / "layers" / "sha256"
        self.containers_dir = self.root / "containers"

    # -- helpers

    def _init(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.images_dir, self.layers_dir, self.containers_dir):
            d.mkdir(mode=0o700 if d != self.layers_dir else 0o755, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._init()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _record_path(self, image_id: str) -> Path:
        return self.images_dir / f"{image_id.split(':', 1)[-1]}.json"

    def _save(self, rec: ImageRecord) -> None:
        write_json(self._record_path(rec.id), rec.to_json(), durable=True)

    def layer_path(self, diff_id: str) -> Path:
        """The extracted layer directory (a unionfs lower dir)."""
        return layerdirs.layer_path(self.root, diff_id)

    def layer_meta(self, diff_id: str) -> dict[str, Any]:
        """The layer's sidecar (see layers.py)."""
        return layerdirs.read_meta(self.root, diff_id)

    def lowerdirs(self, ref: str | ImageRecord) -> list[Path]:
        """The image's layer directories top layer first, as `lowerdir=` wants them.

        A layer listed twice appears once, at its topmost place: everything its lower copy
        could provide, the upper copy already provides above whatever lies between."""
        rec = ref if isinstance(ref, ImageRecord) else self.resolve(ref)
        return [self.layer_path(d) for d in dict.fromkeys(reversed(rec.layers))]

    # -- queries

    def images(self) -> list[ImageRecord]:
        """All image records, oldest import first."""
        out = []
        if self.images_dir.is_dir():
            for p in self.images_dir.glob("*.json"):
                if not is_hex64(p.stem):
                    continue
                try:
                    out.append(ImageRecord.from_json(json.loads(p.read_bytes()), str(p)))
                except FileNotFoundError:
                    continue  # removed meanwhile
                except ValueError as e:
                    raise StoreError(f"{p}: corrupt image record ({e})") from None
        return sorted(out, key=lambda r: (r.imported, r.id))

    def resolve(self, ref: str) -> ImageRecord:
        """An image by `name[:tag]` (tag defaults to latest), by id, or by unique id prefix."""
        records = self.images()
        want = _short(normalize_tag(ref))
        for rec in records:
            if want in {_short(n) for n in rec.names}:
                return rec
        prefix = ref.removeprefix("sha256:")
        if is_hex(prefix, 64):
            found = [r for r in records if r.id.removeprefix("sha256:").startswith(prefix)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise StoreError(f"image id prefix {ref!r} is ambiguous: "
                                 + ", ".join(r.short_id for r in found))
        raise ImageNotFoundError(f"no such image: {ref}")

    def inspect(self, ref: str) -> dict[str, Any]:
        """The image's config (the OCI image config document)."""
        return self.resolve(ref).config

    def users(self, image_id: str) -> list[str]:
        """Ids of the containers whose record references `image_id`."""
        out: list[str] = []
        if not self.containers_dir.is_dir():
            return out
        for cdir in sorted(self.containers_dir.iterdir()):
            path = cdir / "container.json"
            try:
                obj = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                raise StoreError(f"{path}: unreadable container record; remove the container "
                                 "first") from None
            refs = {obj.get(k) for k in ("image_id", "image")} if isinstance(obj, dict) else set()
            if image_id in refs or image_id.removeprefix("sha256:") in refs:
                out.append(cdir.name)
        return out

    # -- changes

    def import_image(self, path: str | os.PathLike[str], *, ref: str | None = None,
                     platform: str | None = None, tags: Sequence[str] = (),
                     progress: ImportProgress | None = None,
                     privileged: bool | None = None) -> ImportResult:
        """Import the image in archive/layout `path`; layers already in the store are reused.

        `ref`/`platform` choose an image in a multi-image archive or index (image.read_image);
        `tags` replaces the archive's repo tags as the image's names. Raises ImageError for bad
        archives (nothing is then added to the store)."""
        from mountctl import layers  # (the extraction machinery: not at every `run`)

        with self._locked(), open_source(path) as src:
            manifest = read_image(src, ref=ref, platform=platform)
            todo = {la.diff_id: la.size for la in manifest.layers
                    if not self.layer_path(la.diff_id).is_dir()}
            total, done = sum(todo.values()), 0
            extracted, reused = [], []
            for la in manifest.layers:
                base = done

                def step(n: int, base: int = base) -> None:
                    if progress is not None:
                        progress(base + n, total)

                with src.open(la.member) as stream:
                    res = layers.extract_layer(stream, self.root, la.diff_id, digest=la.digest,
                                               progress=step, privileged=privileged)
                if res.created:
                    extracted.append(la.diff_id)
                    done += la.size
                elif la.diff_id not in reused and la.diff_id not in extracted:
                    reused.append(la.diff_id)
            if progress is not None:
                progress(total, total)
            names = [normalize_tag(t) for t in (tags or manifest.repo_tags)]
            old = {r.id: r for r in self.images()}
            prev = old.get(manifest.id)
            merged = tuple(dict.fromkeys([*(prev.names if prev else ()), *names]))
            self._take_names(names, manifest.id, old.values())
            rec = ImageRecord(id=manifest.id, names=merged,
                              layers=tuple(la.diff_id for la in manifest.layers),
                              config=manifest.config,
                              imported=prev.imported if prev else time.time(),
                              source=str(manifest.source),
                              manifest_digest=manifest.manifest_digest)
            self._save(rec)
        return ImportResult(rec, tuple(extracted), tuple(reused))

    def _take_names(self, names: Sequence[str], owner: str,
                    records: Iterable[ImageRecord]) -> None:
        short = {_short(n) for n in names}
        for rec in records:
            if rec.id != owner and short & {_short(n) for n in rec.names}:
                kept = tuple(n for n in rec.names if _short(n) not in short)
                self._save(rec._replace(names=kept))

    def tag(self, ref: str, name: str) -> ImageRecord:
        """Add `name` (moved from any other image) to the image `ref`."""
        with self._locked():
            rec = self.resolve(ref)
            new = normalize_tag(name)
            self._take_names([new], rec.id, self.images())
            rec = rec._replace(names=tuple(dict.fromkeys([*rec.names, new])))
            self._save(rec)
            return rec

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The store lock (not reentrant): held by mountctl's runner while it creates a
        container record, so that `remove_image` never misses a new user of an image."""
        return self._locked()

    def add_image(self, config: dict[str, Any], layer: str | os.PathLike[str] | None = None,
                  *, names: Sequence[str] = (), source: str = "") -> ImportResult:
        """Store an image built here (`mountctl commit`): every layer its config lists must
        already be in the store, except the last one when `layer` (a layer tar, any supported
        compression, whose diff_id is the config's last diff_id) is given; it is extracted
        like an imported layer. The image id is the digest of the config's canonical JSON."""
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image_id = compute_digest(config_bytes)
        rootfs = config.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise StoreError("image config has no rootfs.diff_ids list")
        if layer is not None and not diff_ids:
            raise StoreError("image config lists no layer for the new layer tar")
        with self._locked():
            extracted: list[str] = []
            reused: list[str] = []
            if layer is not None:
                from mountctl import layers  # (see import_image)

                with open(layer, "rb") as f:
                    res = layers.extract_layer(f, self.root, diff_ids[-1])
                (extracted if res.created else reused).append(diff_ids[-1])
            missing = [d for d in diff_ids if not self.layer_path(d).is_dir()]
            if missing:
                raise StoreError(f"layers missing from the store: {', '.join(missing)}")
            wanted = [normalize_tag(n) for n in names]
            old = {r.id: r for r in self.images()}
            prev = old.get(image_id)
            merged = tuple(dict.fromkeys([*(prev.names if prev else ()), *wanted]))
            self._take_names(wanted, image_id, old.values())
            rec = ImageRecord(id=image_id, names=merged, layers=tuple(diff_ids), config=config,
                              imported=prev.imported if prev else time.time(), source=source)
            self._save(rec)
        return ImportResult(rec, tuple(extracted), tuple(reused))

    def remove_image(self, ref: str) -> RemoveResult:
        """`rmi`: untag if `ref` is one of several names, else delete the image and collect its
        unshared layers. Refuses (ImageInUseError) while a container references the image."""
        with self._locked():
            rec = self.resolve(ref)
            want = _short(normalize_tag(ref))
            by_name = [n for n in rec.names if _short(n) == want]
            if by_name and len(rec.names) > 1:
                kept = tuple(n for n in rec.names if n not in by_name)
                self._save(rec._replace(names=kept))
                return RemoveResult(rec.id, tuple(by_name), deleted=False, layers_removed=())
            users = self.users(rec.id)
            if users:
                raise ImageInUseError(f"image {rec.short_id} ({', '.join(rec.names) or 'untagged'})"
                                      f" is used by container(s) {', '.join(users)}")
            self._record_path(rec.id).unlink()
            removed = self._gc()
            return RemoveResult(rec.id, rec.names, deleted=True, layers_removed=removed)

    def gc(self) -> tuple[str, ...]:
        """Remove layers no image uses, and leftovers of interrupted imports."""
        with self._locked():
            return self._gc()

    def _gc(self) -> tuple[str, ...]:
        used = {d for r in self.images() for d in r.layers}
        removed = []
        for p in sorted(self.layers_dir.iterdir()):
            name = p.name
            if name.startswith((".tmp-", ".trash-")) or name.endswith(".tmp"):
                layerdirs.remove_tree(p)  # (`.tmp`: a record whose writer was killed, jsonfile)
                continue
            hexpart = name.removesuffix(".meta.json")
            if not is_hex64(hexpart) or f"sha256:{hexpart}" in used:
                continue
            if name.endswith(".meta.json"):
                if not (self.layers_dir / hexpart).exists():
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()  # sidecar without its layer
                continue
            # Rename first: the layer disappears atomically, then is deleted at leisure.
            import tempfile  # (start-up time: not every command needs it)
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{hexpart[:16]}-", dir=self.layers_dir))
            try:
                os.rename(p, trash / "layer")
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            layerdirs.remove_tree(trash)
            with contextlib.suppress(FileNotFoundError):
                (self.layers_dir / f"{hexpart}.meta.json").unlink()
            removed.append(f"sha256:{hexpart}")
        return tuple(removed)

