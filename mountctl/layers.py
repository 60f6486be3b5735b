"""Safe extraction of one layer tar into the content-addressed layer store.

Owns: `<store>/layers/sha256/<hex>/` (the extracted layer, a lower branch for unionfs) and
`<store>/layers/sha256/<hex>.meta.json` (the sidecar: what could not be applied on disk).

Invariants:
  - nothing is ever written outside the layer directory: every file is created with *at() calls
    relative to directory fds that were opened with O_NOFOLLOW, walking one component at a time,
    so an entry never goes through a symlink (refused, with the entry named), never has an
    absolute name or a `..` component (refused), and a hard link never points outside the layer
    or through a symlink (refused). Symlinks themselves may point anywhere: they are created,
    never followed;
  - the tar is read once: the compressed stream is hashed against the blob digest and the
    uncompressed stream against the diff_id while extracting; on any mismatch or error the
    temporary directory is deleted and nothing enters the store;
  - a layer appears atomically: it is extracted into `.tmp-<hex>-*` beside its final place, its
    sidecar is written (tmp + rename), then the directory is renamed into place. So a layer
    directory exists only complete, and then its sidecar exists too. A present layer is never
    extracted again (each layer is shared by all images that use it);
  - OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are kept as plain files: unionfs reads them
    natively. A character device 0/0 (the overlay whiteout) that cannot be created becomes the
    equivalent `.wh.NAME` file, so the union hides the same names either way;
  - nothing is lost when unprivileged: ownership, modes, device numbers and xattrs that could not
    be applied (or were skipped because `privileged` is False) are recorded in the sidecar,
    keyed by the entry's path relative to the layer root ("." for the root itself).
Compression (gzip, zstd, none) is detected from magic bytes, never from names or media types.
"""

from __future__ import annotations

import base64
import errno
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol, cast

from mountctl.image import ImageError, detect_compression, parse_digest
from mountctl.jsonfile import write_json
from mountctl.layerdirs import layer_path, meta_path, read_meta, remove_tree
from unionfs.tuples import NamedTuple

Progress = Callable[[int], None]
"""Called with the number of (compressed) bytes read so far from the layer stream."""

META_VERSION = 1
WHITEOUT_PREFIX = ".wh."
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_PRIV_ERRNOS = (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


class ExtractResult(NamedTuple):
    diff_id: str
    path: Path
    meta_path: Path
    created: bool
    """False when the layer was already in the store (the stream was not read)."""
    bytes_read: int
    recorded: int
    """Number of sidecar entries: metadata the filesystem does not carry."""


# --------------------------------------------------------------------------- streams


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Hashing:
    """A read-through wrapper that hashes and counts what passes."""

    def __init__(self, src: _Readable, progress: Progress | None = None) -> None:
        self._src = src
        self._head = b""
        self._progress = progress
        import hashlib  # (start-up time: not every command needs it)
        self.hash = hashlib.sha256()
        self.count = 0

    def unread(self, data: bytes) -> None:
        """Serve `data` (already hashed) again before reading on."""
        self._head = data + self._head

    def read(self, size: int = -1) -> bytes:
        if self._head:
            n = len(self._head) if size < 0 else min(size, len(self._head))
            data, self._head = self._head[:n], self._head[n:]
            return data
        data = self._src.read(size)
        if data:
            self.hash.update(data)
            self.count += len(data)
            if self._progress is not None:
                self._progress(self.count)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _read_head(src: _Readable, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = src.read(n - len(buf))
        if not data:
            break
        buf += data
    return buf


def _decompressor(raw: _Hashing, compression: str) -> _Readable:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=cast(IO[bytes], raw), mode="rb")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ImageError("zstd-compressed layers need the 'zstandard' package") from None
        return zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], raw),
                                                          read_across_frames=True, closefd=False)
    return raw


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt layer stream raises while it is decompressed and parsed."""
    errors: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, zlib.error,
                                               gzip.BadGzipFile)
    try:
        import zstandard
    except ImportError:
        return errors
    return (*errors, zstandard.ZstdError)


# --------------------------------------------------------------------------- extraction


def _split(name: str, what: str) -> list[str]:
    """Path components of an archive name; refuse absolute names and `..`."""
    if name.startswith("/"):
        raise ImageError(f"{what}: absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{what}: path {name!r} has a '..' component")
    return parts


def _ns(t: float) -> int:
    return int(t * 1_000_000_000)


def _xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    """xattrs from PAX headers (SCHILY.xattr.* raw, LIBARCHIVE.xattr.* base64)."""
    out: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            from urllib.parse import unquote
            try:
                out[unquote(key[len("LIBARCHIVE.xattr."):])] = base64.b64decode(value)
            except ValueError:
                continue
    return out


_KIND = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
         tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def _kind(m: tarfile.TarInfo) -> str:
    return "file" if m.isreg() else _KIND.get(m.type, "?")


class _Extractor:
    """Applies tar entries under one root directory fd, never following a symlink."""

    def __init__(self, root_fd: int, privileged: bool, label: str) -> None:
        self.root = root_fd
        self.privileged = privileged
        self.label = label
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.records: dict[str, dict[str, Any]] = {}
        # Directory mode/mtime are applied at the end: children change a directory's mtime, and
        # an unprivileged extractor could not add children to a 0555 directory.
        self.dirs: dict[str, tuple[int, int | None]] = {"": (0o755, None)}

    # -- walking

    def _walk(self, parts: list[str], name: str, create: bool) -> int:
        """An fd of the directory `parts` below the root; implicit parents are created 0755."""
        fd = os.dup(self.root)
        try:
            for i, comp in enumerate(parts):
                sub = "/".join(parts[: i + 1])
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    self.dirs.setdefault(sub, (0o755, None))
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(comp, dir_fd=fd)
                    if stat.S_ISLNK(st.st_mode):
                        raise ImageError(f"{self.label}: entry {name!r} goes through the "
                                         f"symlink {sub!r}") from None
                    raise ImageError(f"{self.label}: entry {name!r}: {sub!r} is not a "
                                     "directory") from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _clear(self, parent: int, name: str, path: str) -> None:
        """Remove what an earlier entry put at `path` (a later entry replaces it)."""
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)
        prefix = path + "/"
        for table in (self.records, self.dirs):
            for key in [k for k in table if k == path or k.startswith(prefix)]:
                del table[key]

    # -- metadata

    def _record(self, path: str, m: tarfile.TarInfo, missing: str,
                xattrs: dict[str, bytes] | None = None) -> None:
        rec = self.records.setdefault(path or ".", {
            "type": _kind(m), "uid": m.uid, "gid": m.gid, "mode": m.mode & 0o7777,
            "missing": []})
        if m.ischr() or m.isblk():
            rec["devmajor"], rec["devminor"] = m.devmajor, m.devminor
        if missing not in rec["missing"]:
            rec["missing"].append(missing)
        if xattrs:
            rec.setdefault("xattrs", {}).update(
                {k: base64.b64encode(v).decode() for k, v in xattrs.items()})

    def _chown(self, path: str, m: tarfile.TarInfo, target: int | tuple[int, str]) -> None:
        if not self.privileged:
            if (m.uid, m.gid) != (self.euid, self.egid):
                self._record(path, m, "chown")
            return
        try:
            if isinstance(target, int):
                os.fchown(target, m.uid, m.gid)
            else:
                os.chown(target[1], m.uid, m.gid, dir_fd=target[0], follow_symlinks=False)
        except OSError as e:
            if e.errno not in _PRIV_ERRNOS:
                raise
            self._record(path, m, "chown")

    def _set_xattrs(self, path: str, m: tarfile.TarInfo, target: int | tuple[int, str]) -> None:
        failed: dict[str, bytes] = {}
        for key, value in _xattrs(m).items():
            if not self.privileged and not key.startswith("user."):
                failed[key] = value
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:  # no fd for this kind of file: go through an O_PATH fd, never a name
                    pfd = os.open(target[1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=target[0])
                    try:
                        os.setxattr(f"/proc/self/fd/{pfd}", key, value)
                    finally:
                        os.close(pfd)
            except OSError as e:
                if e.errno not in (*_PRIV_ERRNOS, errno.ENOENT, errno.ENODATA):
                    raise
                failed[key] = value
        if failed:
            self._record(path, m, "xattr", failed)

    # -- entries

    def apply(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _split(m.name, f"{self.label}: entry {m.name!r}")
        path = "/".join(parts)
        if not parts:
            if not m.isdir():
                raise ImageError(f"{self.label}: entry {m.name!r}: the layer root must be a "
                                 "directory")
            self._chown("", m, self.root)
            self._set_xattrs("", m, self.root)
            self.dirs[""] = (m.mode & 0o7777, _ns(m.mtime))
            return
        parent = self._walk(parts[:-1], m.name, create=True)
        try:
            self._apply_in(tar, m, parent, parts[-1], path)
        finally:
            os.close(parent)

    def _apply_in(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parent: int, name: str,
                  path: str) -> None:
        mode, mtime = m.mode & 0o7777, _ns(m.mtime)
        if m.isdir():
            try:
                is_dir = stat.S_ISDIR(os.lstat(name, dir_fd=parent).st_mode)
            except FileNotFoundError:
                is_dir = False
            if not is_dir:
                self._clear(parent, name, path)
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                self._chown(path, m, fd)
                self._set_xattrs(path, m, fd)
            finally:
                os.close(fd)
            self.dirs[path] = (mode, mtime)
            return
        if m.islnk():
            self._hardlink(m, parent, name, path)
            return
        self._clear(parent, name, path)
        if m.isreg():
            src = tar.extractfile(m)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=parent)
            try:
                if src is not None:
                    while chunk := src.read(_CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                self._chown(path, m, fd)
                os.fchmod(fd, mode)
                self._set_xattrs(path, m, fd)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
            return
        if m.issym():
            os.symlink(m.linkname, name, dir_fd=parent)
        elif m.isfifo():
            os.mkfifo(name, mode, dir_fd=parent)
        elif m.ischr() or m.isblk():
            if not self._mknod(m, parent, name, path):
                return
        else:
            raise ImageError(f"{self.label}: entry {m.name!r} has unsupported type {m.type!r}")
        self._chown(path, m, (parent, name))
        if not m.issym():
            os.chmod(name, mode, dir_fd=parent)
        self._set_xattrs(path, m, (parent, name))
        os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def _mknod(self, m: tarfile.TarInfo, parent: int, name: str, path: str) -> bool:
        """Create a device node; False (and recorded) when that is not permitted."""
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
        if self.privileged:
            try:
                os.mknod(name, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor),
                         dir_fd=parent)
                return True
            except OSError as e:
                if e.errno not in _PRIV_ERRNOS:
                    raise
        self._record(path, m, "mknod")
        if m.ischr() and m.devmajor == 0 and m.devminor == 0 and not name.startswith(
                WHITEOUT_PREFIX):
            # The overlay whiteout: keep its meaning with the OCI form the union also reads.
            wh = WHITEOUT_PREFIX + name
            dirpath = path.rpartition("/")[0]
            self._clear(parent, wh, f"{dirpath}/{wh}" if dirpath else wh)
            os.close(os.open(wh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600, dir_fd=parent))
        return False

    def _hardlink(self, m: tarfile.TarInfo, parent: int, name: str, path: str) -> None:
        what = f"{self.label}: hard link {m.name!r} -> {m.linkname!r}"
        target = _split(m.linkname, what)  # refuses absolute targets and '..' components
        if not target:
            raise ImageError(f"{what}: target outside the layer")
        tpath = "/".join(target)
        if tpath == path:
            return
        if tpath in self.records and "mknod" in self.records[tpath]["missing"]:
            self.records[path] = dict(self.records[tpath])  # a device we could not create
            return
        try:
            tparent = self._walk(target[:-1], m.name, create=False)
        except FileNotFoundError:
            raise ImageError(f"{what}: target does not exist in the layer") from None
        try:
            try:
                st = os.lstat(target[-1], dir_fd=tparent)
            except FileNotFoundError:
                raise ImageError(f"{what}: target does not exist in the layer") from None
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{what}: target is a directory")
            self._clear(parent, name, path)
            os.link(target[-1], name, src_dir_fd=tparent, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            os.close(tparent)
        if tpath in self.records:
            self.records[path] = dict(self.records[tpath])

    def finish(self) -> None:
        """Apply directory modes and mtimes, deepest first."""
        for path in sorted(self.dirs, key=lambda p: -p.count("/") - 1 if p else 0):
            mode, mtime = self.dirs[path]
            try:
                fd = self._walk(path.split("/") if path else [], path, create=False)
            except (FileNotFoundError, ImageError):
                continue
            try:
                os.fchmod(fd, mode)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)


def extract_layer(stream: IO[bytes], store: Path, diff_id: str, *, digest: str | None = None,
                  progress: Progress | None = None,
                  privileged: bool | None = None) -> ExtractResult:
    """Extract one layer tar stream (gzip, zstd or plain) into the store, unless already there.

    `digest` is the stored blob's digest (checked over the bytes of `stream`), `diff_id` the
    uncompressed tar's (always checked). `privileged` None means "euid is 0": when False, chown,
    mknod and non-`user.` xattrs are not attempted, only recorded in the sidecar. `progress` is
    called with the count of bytes read from `stream` so far.
    Raises ImageError (the message names the layer and the offending entry) on corrupt data,
    digest mismatches and unsafe entries; the store is then unchanged.
    """
    final = layer_path(store, diff_id)
    meta = meta_path(store, diff_id)
    if digest is not None:
        parse_digest(digest, f"layer {diff_id}")
    if final.is_dir() and meta.is_file():
        return ExtractResult(diff_id, final, meta, created=False, bytes_read=0,
                             recorded=len(read_meta(store, diff_id).get("entries", {})))
    if privileged is None:
        privileged = os.geteuid() == 0
    final.parent.mkdir(parents=True, exist_ok=True)
    import tempfile  # (start-up time: not every command needs it)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name[:16]}-", dir=final.parent))
    label = f"layer {diff_id}"
    try:
        root_fd = os.open(tmp, _DIR_FLAGS)
        try:
            ex = _Extractor(root_fd, privileged, label)
            raw = _Hashing(stream, progress)
            head = _read_head(raw, 8)
            compression = detect_compression(head, label)
            raw.unread(head)
            tar_stream = _Hashing(_decompressor(raw, compression))
            try:
                with tarfile.open(fileobj=cast(IO[bytes], tar_stream), mode="r|",
                                  bufsize=_CHUNK) as tar:
                    for member in tar:
                        try:
                            ex.apply(tar, member)
                        except OSError as e:
                            if isinstance(e, gzip.BadGzipFile):
                                raise
                            raise ImageError(f"{label}: entry {member.name!r}: "
                                             f"{e.strerror or e}") from None
                tar_stream.drain()
                raw.drain()
            except _stream_errors() as e:
                raise ImageError(f"{label}: corrupt {compression} tar stream: {e}") from None
            got = tar_stream.digest()
            if got != diff_id:
                raise ImageError(f"{label}: diff_id mismatch: the tar stream hashes to {got}")
            if digest is not None and raw.digest() != digest:
                raise ImageError(f"{label}: blob digest mismatch: expected {digest}, "
                                 f"got {raw.digest()}")
            ex.finish()
        finally:
            os.close(root_fd)
        write_json(meta, {"version": META_VERSION, "diff_id": diff_id,
                          "privileged": privileged, "entries": ex.records}, mode=0o644)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_tree(tmp)  # another import won the race; its copy is identical
            return ExtractResult(diff_id, final, meta, created=False, bytes_read=raw.count,
                                 recorded=len(ex.records))
    except BaseException:
        remove_tree(tmp)
        raise
    return ExtractResult(diff_id, final, meta, created=True, bytes_read=raw.count,
                         recorded=len(ex.records))
