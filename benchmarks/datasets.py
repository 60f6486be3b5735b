"""Benchmark datasets: three overlay-format layers, their flattened view, the unionfs-fuse
conversion, and the tarball for the untar workload. Built once per (dataset, scale), cached.

- `synthetic` (no network): a generated tree of small files in three layers, with directory and
  file whiteouts, an opaque directory, a file replaced in a higher layer, symlinks, a static
  busybox as /bin/sh when the host has one (for the container-start workload), a large file and
  a copy-up file.
- `rootfs`: Debian bookworm minbase made by debootstrap (the base layer); a layer made by
  `apt-get install python3` in a chroot on kernel overlayfs, plus the large and copy-up data
  files; a layer that purges a package and deletes documentation, man pages and locales (real
  whiteouts written by overlayfs) and recreates /etc/apt/apt.conf.d (an opaque directory).

The cache lives in `$UNIONFS_BENCH_CACHE` or /var/cache/unionfs-bench. A dataset directory is
built under a temporary name and renamed into place when complete, so an interrupted build is
rebuilt, never half-used.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import mounts
from .backends import Stack
from .trees import flatten, make_opaque, make_whiteout, to_unionfs_fuse
from .util import BenchError, rmtree, run, write_pattern

DATASET_VERSION = 3
DEFAULT_CACHE = Path("/var/cache/unionfs-bench")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
ROOTFS_PURGED_PACKAGE = "e2fsprogs"
ROOTFS_OPAQUE_DIR = "etc/apt/apt.conf.d"
MiB = 1 << 20


@dataclass(frozen=True)
class Scale:
    name: str
    tree_files: int
    """small files in the synthetic tree"""
    big: int
    """bytes of the large file (sequential and random reads)"""
    copyup: int
    """bytes of the lower file that is appended to"""
    seqwrite: int
    create: int
    """small files created (and removed)"""
    untar: int
    """bytes in the untar archive"""
    randreads: int
    """random 4 KiB reads per random-read workload"""
    timeout: float
    """seconds allowed for one workload command"""


SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", 120, 4 * MiB, 1 * MiB, 4 * MiB, 200, 2 * MiB, 200, 120),
    "small": Scale("small", 3000, 64 * MiB, 16 * MiB, 64 * MiB, 2000, 16 * MiB, 2000, 600),
    "medium": Scale("medium", 8000, 256 * MiB, 64 * MiB, 256 * MiB, 5000, 48 * MiB, 5000,
                    1200),
    "full": Scale("full", 20000, 1024 * MiB, 256 * MiB, 1024 * MiB, 10000, 100 * MiB, 10000,
                  3600),
}

BIG = "data/big.bin"
COPYUP = "data/copyup.bin"


@dataclass(frozen=True)
class Dataset:
    kind: str
    scale: Scale
    root: Path
    layers: tuple[Path, ...]
    """top-first, overlay format"""
    features: frozenset[str]
    """"sh" (a /bin/sh that runs in a chroot), "python3", "usr" (a usr/ tree)"""
    entries: int
    """objects in the merged view"""

    @property
    def flat(self) -> Path:
        return self.root / "flat"

    def ufs_layers(self, metadir: str) -> tuple[Path, ...]:
        """The layers in unionfs-fuse's format (converted on first use, then cached)."""
        out = self.root / f"ufs{metadir}"
        if not (out / ".complete").exists():
            tmp = self.root / f".ufs{metadir}.tmp"
            rmtree(tmp)
            rmtree(out)
            for i, layer in enumerate(self.layers):
                to_unionfs_fuse(layer, tmp / str(i), metadir)
            (tmp / ".complete").touch()
            os.rename(tmp, out)
        return tuple(out / str(i) for i in range(len(self.layers)))

    @property
    def tarball(self) -> Path:
        return self.root / "untar.tar"

    def lower_file(self, rel: str) -> Path:
        """Where `rel` lives in the layers (the topmost layer having it)."""
        for layer in self.layers:
            if os.path.lexists(layer / rel):
                return layer / rel
        raise FileNotFoundError(rel)

    def stack(self, ufs_metadir: str | None = None) -> Stack:
        ufs = self.ufs_layers(ufs_metadir) if ufs_metadir else None
        return Stack(self.layers, self.flat, ufs, (COPYUP,))


def cache_dir(override: Path | None = None) -> Path:
    if override is not None:
        return override
    env = os.environ.get("UNIONFS_BENCH_CACHE")
    return Path(env) if env else DEFAULT_CACHE


def ensure_dataset(kind: str, scale: Scale, cache: Path | None = None,
                   log: Callable[[str], None] = print) -> Dataset:
    """Load the cached dataset, building it first if needed."""
    cache = cache_dir(cache)
    root = cache / f"{kind}-{scale.name}"
    manifest = root / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("version") == DATASET_VERSION:
            return _load(root, data, scale)
        log(f"dataset {root} is from an older version: rebuilding")
        rmtree(root)
    if kind == "synthetic":
        builder: Callable[[Path, Scale, Path, Callable[[str], None]], dict[str, object]] = \
            _build_synthetic
    elif kind == "rootfs":
        builder = _build_rootfs
    else:
        raise ValueError(f"unknown dataset {kind!r} (synthetic or rootfs)")
    tmp = cache / f".{kind}-{scale.name}.building"
    rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        log(f"building dataset {kind} ({scale.name}) in {root} ...")
        data = builder(tmp, scale, cache, log)
        layers = [tmp / "layers" / str(i) for i in range(int(str(data["nlayers"])))]
        flatten(layers, tmp / "flat")
        _make_tarball(tmp / "untar.tar", scale.untar)
        data["entries"] = sum(len(ds) + len(fs) for _, ds, fs in os.walk(tmp / "flat"))
        data["version"] = DATASET_VERSION
        (tmp / "manifest.json").write_text(json.dumps(data, indent=1))
        os.rename(tmp, root)
    except BaseException:
        mounts.unmount_all_below(tmp)
        rmtree(tmp)
        raise
    return _load(root, data, scale)


def _load(root: Path, data: dict[str, object], scale: Scale) -> Dataset:
    n = int(str(data["nlayers"]))
    feats = data.get("features", [])
    assert isinstance(feats, list)
    return Dataset(str(data["kind"]), scale, root,
                   tuple(root / "layers" / str(i) for i in range(n)),
                   frozenset(str(f) for f in feats), int(str(data.get("entries", 0))))


# -- synthetic ------------------------------------------------------------------------------------

def _static_busybox() -> Path | None:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file():
            res = subprocess.run(["file", "-L", str(p)], capture_output=True, timeout=10,
                                 check=False)
            if b"statically linked" in res.stdout or b"static-pie" in res.stdout:
                return p
    return None


def _small(path: Path, rnd: random.Random, lo: int = 64, hi: int = 64 << 10) -> None:
    size = int(lo * (hi / lo) ** rnd.random())
    path.write_bytes(rnd.randbytes(size))


def _build_synthetic(tmp: Path, scale: Scale, cache: Path,
                     log: Callable[[str], None]) -> dict[str, object]:
    """layers/0 (top) deletes and recreates, layers/1 adds files and data, layers/2 is the base."""
    rnd = random.Random(20240505)
    top, mid, base = (tmp / "layers" / str(i) for i in range(3))
    for d in (top, mid, base):
        d.mkdir(parents=True)
    n_lib = int(scale.tree_files * 0.7)
    n_doc = int(scale.tree_files * 0.1)
    n_extra = scale.tree_files - n_lib - n_doc
    per_dir = 20
    lib_files: list[str] = []
    for i in range(n_lib):
        pkg, mod = divmod(i // per_dir, 5)
        rel = f"usr/lib/pkg{pkg:03d}/mod{mod}/file{i:05d}.{('py', 'so', 'txt')[i % 3]}"
        lib_files.append(rel)
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        _small(base / rel, rnd)
    n_pkgs = max(1, n_doc // 4)
    for i in range(n_doc):
        rel = f"usr/share/doc/pkg{i % n_pkgs:03d}/doc{i:05d}"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        _small(base / rel, rnd, 200, 8000)
    (base / "usr/bin").mkdir(parents=True)
    for i in range(10):
        os.symlink(f"../lib/pkg000/mod0/file{i:05d}.py", base / f"usr/bin/tool{i}")
    (base / "etc/conf.d").mkdir(parents=True)
    for i in range(10):
        (base / f"etc/conf.d/c{i}.conf").write_text(f"option{i}=yes\n")
    (base / "etc/hostname").write_text("bench\n")
    (base / "data").mkdir()
    (base / "tmp").mkdir(mode=0o1777)
    os.chmod(base / "tmp", 0o1777)
    features = ["usr"]
    busybox = _static_busybox()
    if busybox is not None:
        (base / "bin").mkdir()
        shutil.copy2(busybox, base / "bin/busybox")
        os.symlink("busybox", base / "bin/sh")
        features.append("sh")

    # middle layer: more files, replacements, the data files
    for i in range(n_extra):
        rel = f"usr/lib/extra{i // per_dir:03d}/x{i:05d}.so"
        (mid / rel).parent.mkdir(parents=True, exist_ok=True)
        _small(mid / rel, rnd)
    for rel in lib_files[::20]:
        (mid / rel).parent.mkdir(parents=True, exist_ok=True)
        _small(mid / rel, rnd)
    (mid / "data").mkdir()
    log(f"  writing {scale.big >> 20} MiB and {scale.copyup >> 20} MiB data files")
    write_pattern(mid / BIG, scale.big, 1)
    write_pattern(mid / COPYUP, scale.copyup, 2)

    # top layer: whiteouts (files and whole directories) and an opaque directory
    (top / "usr/share/doc").mkdir(parents=True)
    for p in range(0, n_pkgs, 2):
        make_whiteout(top / f"usr/share/doc/pkg{p:03d}")
    for rel in lib_files[7::50]:
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        make_whiteout(top / rel)
    (top / "etc/conf.d").mkdir(parents=True)
    make_opaque(top / "etc/conf.d")
    (top / "etc/conf.d/only.conf").write_text("only=1\n")
    (top / "etc/motd").write_text("synthetic benchmark tree\n")
    return {"kind": "synthetic", "nlayers": 3, "features": features}


# -- rootfs ---------------------------------------------------------------------------------------

CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
              "LANG": "C.UTF-8", "HOME": "/root"}


def _debootstrap(cache: Path, log: Callable[[str], None]) -> Path:
    """The debootstrap minbase tree, cached across scales."""
    stage = cache / "rootfs" / "stage-base"
    if (stage / ".bench-complete").exists():
        return stage
    if shutil.which("debootstrap") is None:
        raise BenchError("the rootfs dataset needs debootstrap (apt-get install debootstrap)")
    tmp = cache / "rootfs" / "stage-base.tmp"
    rmtree(tmp)
    debs = cache / "rootfs" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    log(f"  debootstrap --variant=minbase {DEBIAN_SUITE} (a few minutes)")
    run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}", DEBIAN_SUITE, str(tmp),
         DEBIAN_MIRROR], timeout=3600)
    rmtree(stage)
    os.rename(tmp, stage)
    (stage / ".bench-complete").touch()
    return stage


def _overlay_layer(lowers: list[Path], out: Path, scratch: Path, commands: list[list[str]],
                   binds: bool, log: Callable[[str], None]) -> None:
    """Mount kernel overlayfs with an empty upper `out`, run `commands` chrooted in it; `out`
    is then a layer in overlay format (whiteouts and opaque directories written by the kernel)."""
    work, mnt = scratch / "work", scratch / "mnt"
    for d in (out, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    mounts.mount_overlay(lowers, out, work, mnt,
                         ["redirect_dir=off", "index=off", "metacopy=off"])
    try:
        if binds:
            run(["mount", "--bind", "/dev", str(mnt / "dev")])
            run(["mount", "-t", "proc", "proc", str(mnt / "proc")])
        for argv in commands:
            log(f"  chroot: {' '.join(argv)}")
            run(["chroot", str(mnt), *argv], env=CHROOT_ENV, timeout=3600)
    finally:
        mounts.unmount_all_below(mnt)
        mounts.unmount(mnt)
        rmtree(work)


def _rootfs_layers(cache: Path, log: Callable[[str], None]) -> tuple[Path, Path, Path]:
    """(delete layer, python layer, base), scale-independent and cached."""
    base = _debootstrap(cache, log)
    r = cache / "rootfs"
    py, dele = r / "layer-python3", r / "layer-delete"
    if not (py / ".bench-complete").exists():
        rmtree(py)
        tmp = r / "layer-python3.tmp"
        rmtree(tmp)
        with_scratch = r / "scratch"
        rmtree(with_scratch)
        _overlay_layer([base], tmp, with_scratch, [
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", "python3"],
            ["apt-get", "clean"],
            ["sh", "-c", "rm -rf /var/lib/apt/lists/*"],
        ], binds=True, log=log)
        rmtree(with_scratch)
        os.rename(tmp, py)
        (py / ".bench-complete").touch()
    if not (dele / ".bench-complete").exists():
        rmtree(dele)
        tmp = r / "layer-delete.tmp"
        rmtree(tmp)
        with_scratch = r / "scratch"
        rmtree(with_scratch)
        _overlay_layer([py, base], tmp, with_scratch, [
            ["dpkg", "--purge", ROOTFS_PURGED_PACKAGE],
            ["sh", "-c", "rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/locale/*"],
            ["sh", "-c", f"rm -rf /{ROOTFS_OPAQUE_DIR} && mkdir /{ROOTFS_OPAQUE_DIR} && "
                         f"echo 'APT::Install-Recommends \"false\";' "
                         f"> /{ROOTFS_OPAQUE_DIR}/99bench"],
        ], binds=False, log=log)
        rmtree(with_scratch)
        os.rename(tmp, dele)
        (dele / ".bench-complete").touch()
    return dele, py, base


def _build_rootfs(tmp: Path, scale: Scale, cache: Path,
                  log: Callable[[str], None]) -> dict[str, object]:
    dele, py, base = _rootfs_layers(cache, log)
    layers = tmp / "layers"
    layers.mkdir()
    run(["cp", "-al", str(dele), str(layers / "0")])
    run(["cp", "-al", str(py), str(layers / "1")])
    run(["cp", "-al", str(base), str(layers / "2")])
    for i in range(3):
        (layers / str(i) / ".bench-complete").unlink(missing_ok=True)
    data = layers / "1" / "data"
    data.mkdir()
    log(f"  writing {scale.big >> 20} MiB and {scale.copyup >> 20} MiB data files")
    write_pattern(layers / "1" / BIG, scale.big, 1)
    write_pattern(layers / "1" / COPYUP, scale.copyup, 2)
    return {"kind": "rootfs", "nlayers": 3, "features": ["usr", "sh", "python3"],
            "purged_package": ROOTFS_PURGED_PACKAGE, "opaque_dir": ROOTFS_OPAQUE_DIR}


# -- the untar archive ----------------------------------------------------------------------------

def _make_tarball(path: Path, total: int) -> None:
    """A tar of generated files (1 KiB..1 MiB, incompressible) adding up to about `total`."""
    rnd = random.Random(7)
    done = 0
    i = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        dirs = 0
        while done < total:
            if i % 50 == 0:
                info = tarfile.TarInfo(f"tree/d{dirs:03d}")
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                dirs += 1
            size = min(int(1024 * 1024 ** rnd.random()), total - done) if total > done else 0
            info = tarfile.TarInfo(f"tree/d{dirs - 1:03d}/f{i:05d}")
            info.size = size
            info.mode = 0o644
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(rnd.randbytes(size)))
            done += size + 512
            i += 1
