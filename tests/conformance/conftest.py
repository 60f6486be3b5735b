"""Fixtures of the conformance suite: one set of POSIX tests, several targets.

Targets (ids): `plain` (a directory on the host file system, validates the tests), the kernel
overlayfs oracle `overlay-fresh` / `overlay-lower`, and `unionfs-fresh` / `unionfs-lower` (plus
`unionfs-noopen`, `unionfs-index` and `unionfs-trio`, lower-only directories with `noopen=1` /
a lower index / pyfuse3's trio loop instead of the default direct one).
`CONFORMANCE_EXTRA=fuse-overlayfs` adds `fusefs-fresh` / `fusefs-lower` (comma-separated list).

*-fresh: the test directory is created through the mount (it lives in the upper branch only).
*-lower: the test directory and its declared tree exist only in the lower branch.
Select targets with -k, e.g. `pytest tests/conformance -k "plain or overlay-lower"`.

Mounting per test would cost a Python FUSE server start each time, so every union target is
mounted once per session (`conformance_backend`): for *-lower, the trees of all collected tests
are placed in the lower branch, one directory per test, before mounting. A per-test watchdog
kills a FUSE server that hangs, a probe after each test reports a mount that died during it
(with the server log), and the next test gets a new mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.support import (
    TREE_MARKER,
    Dir,
    Entry,
    Target,
    TargetSpec,
    Tree,
    materialise,
)
from tests.helpers.mounts import Mount, is_mounted, mounted
from unionfs import layerindex

BASE_TARGETS = [
    TargetSpec("plain", "plain", "plain"),
    TargetSpec("overlay-fresh", "overlay", "fresh"),
    TargetSpec("overlay-lower", "overlay", "lower"),
    TargetSpec("unionfs-fresh", "unionfs", "fresh"),
    TargetSpec("unionfs-lower", "unionfs", "lower"),
    TargetSpec("unionfs-noopen", "unionfs", "lower"),
    TargetSpec("unionfs-index", "unionfs", "lower"),
    TargetSpec("unionfs-trio", "unionfs", "lower"),
]
EXTRA_TARGETS = {
    "fuse-overlayfs": [
        TargetSpec("fusefs-fresh", "fuse-overlayfs", "fresh"),
        TargetSpec("fusefs-lower", "fuse-overlayfs", "lower"),
    ],
}

# Kernel overlayfs as the oracle, with the features that make it POSIX on renames of lower
# directories (redirect_dir; EXDEV otherwise) and hard links across copy-up (index).
MOUNT_OPTIONS: dict[str, list[str]] = {
    "overlay": ["redirect_dir=on", "index=on"],
    "unionfs": [],
    "fuse-overlayfs": [],
}

# options of one target on top of its kind's
TARGET_OPTIONS: dict[str, list[str]] = {
    "unionfs-noopen": ["noopen=1"],  # per-inode I/O: the kernel sends no open/release
    # the index checked object by object, then lower attributes served from it
    "unionfs-index": ["lowerindex_check=files"],
    "unionfs-trio": ["loop=trio"],  # the loop upstream pyfuse3 gets
}
# targets mounted with a lower index (`unionfs index build`) of their lower branch
INDEXED = {"unionfs-index"}

WATCHDOG_S = 20.0  # a single test never needs this long; a FUSE server that hangs is killed
PROBE_S = 10.0


def _targets() -> list[TargetSpec]:
    out = list(BASE_TARGETS)
    for name in filter(None, os.environ.get("CONFORMANCE_EXTRA", "").split(",")):
        if name.strip() not in EXTRA_TARGETS:
            raise pytest.UsageError(f"CONFORMANCE_EXTRA: unknown {name!r}; "
                                    f"known: {', '.join(EXTRA_TARGETS)}")
        out += EXTRA_TARGETS[name.strip()]
    return out


TARGETS = _targets()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{TREE_MARKER}(tree): initial tree of a conformance test (use support.tree)")


def _tree_of(item: pytest.Item) -> Tree:
    marker = item.get_closest_marker(TREE_MARKER)
    return marker.args[0] if marker is not None else {}


def _dirname(nodeid: str, name: str) -> str:
    digest = hashlib.sha1(nodeid.encode()).hexdigest()[:8]
    return f"{name[:40]}-{digest}"


class Backend:
    """One target for the whole session: a base directory and, for unions, a live mount."""

    def __init__(self, spec: TargetSpec, base: Path, items: list[pytest.Item]) -> None:
        self.spec = spec
        self.base = base
        self.items = items
        self.stack = contextlib.ExitStack()
        self.mount: Mount | None = None
        self.generation = 0
        self.upper: Path | None = None
        self.lower = base / "lower"
        self.lower.mkdir()
        if spec.variant == "lower":
            fd = os.open(self.lower, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for item in items:
                    name = _dirname(item.nodeid, getattr(item, "originalname", item.name))
                    os.mkdir(name, 0o755, dir_fd=fd)
                    dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                    try:
                        materialise(dfd, {".": _root_entry(item), **_tree_of(item)})
                    finally:
                        os.close(dfd)
            finally:
                os.close(fd)

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    def start(self) -> None:
        if self.spec.kind == "plain":
            return
        self.generation += 1
        g = self.generation
        upper, work = self.base / f"upper{g}", self.base / f"work{g}"
        upper.mkdir()
        work.mkdir()
        self.upper = upper
        log = self.base / f"server{g}.log" if self.spec.kind == "unionfs" else None
        options = MOUNT_OPTIONS[self.spec.kind] + TARGET_OPTIONS.get(self.spec.id, [])
        if self.spec.id in INDEXED:
            index = self.base / "lower.idx"
            if not index.exists():
                layerindex.write([str(self.lower)], str(index))
            options = [*options, f"lowerindex={index}"]
        self.stack = contextlib.ExitStack()
        self.mount = self.stack.enter_context(
            mounted(self.spec.kind, [self.lower], upper, work, self.mnt, options, log=log))

    def stop(self) -> None:
        self.stack.close()
        self.mount = None

    def healthy(self) -> str | None:
        """None if the mount answers, else what is wrong with it."""
        if self.spec.kind == "plain":
            return None
        m = self.mount
        if m is None:
            return "not mounted"
        if m.server is not None and m.server.poll() is not None:
            return f"server exited with {m.server.returncode}"
        if not is_mounted(self.mnt):
            return "mount point is no longer mounted"
        err: list[BaseException] = []

        def probe() -> None:
            try:
                os.statvfs(self.mnt)  # never answered from a cache
            except BaseException as e:
                err.append(e)

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(PROBE_S)
        if t.is_alive():
            self.kill_server()
            return f"mount did not answer statvfs within {PROBE_S}s"
        return f"probe failed: {err[0]!r}" if err else None

    def kill_server(self) -> None:
        m = self.mount
        if m is not None and m.server is not None and m.server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.server.pid, signal.SIGKILL)  # our own server, started in its session

    def server_log(self) -> str:
        return self.mount.server_log() if self.mount is not None else ""

    def test_root(self, item: pytest.Item) -> tuple[Path, Path | None, Path | None]:
        """The test's directory, made ready: (path, its place in lower, its place in upper)."""
        name = _dirname(item.nodeid, getattr(item, "originalname", item.name))
        if self.spec.kind == "plain":
            root = self.base / "plain" / name
            root.parent.mkdir(exist_ok=True)
            _make_root(root, item)
            return root, None, None
        root = self.mnt / name
        if self.spec.variant == "fresh":
            _make_root(root, item)
        else:
            assert root.is_dir(), f"{root} missing from the lower branch"
        assert self.upper is not None
        return root, self.lower / name, self.upper / name


def _root_entry(item: pytest.Item) -> Entry:
    return _tree_of(item).get(".", Dir())


def _make_root(root: Path, item: pytest.Item) -> None:
    try:
        root.mkdir(0o755)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            materialise(fd, {".": _root_entry(item), **_tree_of(item)})
        finally:
            os.close(fd)
    except OSError as e:
        pytest.fail(f"creating the initial tree in {root} failed: {e!r}", pytrace=False)


@pytest.fixture(scope="session", params=TARGETS, ids=[t.id for t in TARGETS])
def conformance_backend(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    spec: TargetSpec = request.param
    items = [i for i in request.session.items
             if getattr(getattr(i, "callspec", None), "params", {}).get(
                 "conformance_backend") == spec]
    base = tmp_path_factory.mktemp(f"conf-{spec.id}", numbered=True)
    backend = Backend(spec, base, items)
    try:
        backend.start()
        yield backend
    finally:
        backend.stop()


@pytest.fixture
def target(request: pytest.FixtureRequest, conformance_backend: Backend) -> Iterator[Target]:
    backend = conformance_backend
    problem = backend.healthy()
    if problem is not None:  # an earlier test broke it (and was told): start over
        backend.stop()
        backend.start()
    old_umask = os.umask(0o022)
    fired = threading.Event()

    def watchdog() -> None:
        fired.set()
        backend.kill_server()

    timer = threading.Timer(WATCHDOG_S, watchdog)
    timer.daemon = True
    timer.start()
    try:
        root, in_lower, in_upper = backend.test_root(request.node)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield Target(backend.spec, root, fd, in_lower, in_upper)
        finally:
            os.close(fd)
    finally:
        timer.cancel()
        os.umask(old_umask)
    if fired.is_set():
        pytest.fail(f"{backend.spec.id}: test ran over {WATCHDOG_S}s; FUSE server killed\n"
                    f"{backend.server_log()[-4000:]}")
    problem = backend.healthy()
    if problem is not None:
        pytest.fail(f"{backend.spec.id}: the mount broke during this test: {problem}\n"
                    f"{backend.server_log()[-4000:]}")
