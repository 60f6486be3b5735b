"""The same random operation sequences on the SUT and on kernel overlayfs, compared step by step.

Each example generates a layer stack (tests.helpers.layers), materialises it twice, mounts the SUT
(DIFF_SUT, default unionfs) on one copy and kernel overlayfs (`index=on,redirect_dir=on`) on the
other, then applies operations on paths from a small pool, so they collide often. After every
operation the outcomes (returned value or errno) must be equal. At every remount and at the end
the full merged trees, the meaning of both upper directories and the kernel's reading of the
SUT's layers are compared (see harness.DiffPair.check_epoch).

`OciMachine` does the same with the SUT's copy converted to the OCI `.wh.` encoding, which the
kernel does not understand: the oracle's view of the original encoding is the model.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
)

from tests.differential.harness import (
    ORACLE_KIND,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SUT_KIND,
    DiffPair,
    snapshot,
    visible,
)
from tests.differential.settings import STEPS, diff_settings, stack_strategy
from tests.helpers.layers import (
    DANGLING_ABSOLUTE,
    NAMES_BY_DEPTH,
    PATH_POOL,
    Blob,
    Stack,
    to_oci,
)

_D1 = [p for p in PATH_POOL if p.count("/") == 0]
_D2 = [p for p in PATH_POOL if p.count("/") == 1]
_D3 = [p for p in PATH_POOL if p.count("/") == 2]
assert len(_D1) + len(_D2) + len(_D3) == len(PATH_POOL) and len(NAMES_BY_DEPTH) == 3

POOL = st.one_of(st.sampled_from(_D1), st.sampled_from(_D2), st.sampled_from(_D3))
KNOWN: Bundle[str] = Bundle("known")
"""Paths that existed in the merged view after mounting, or that an operation created."""
PATHS = st.one_of(KNOWN, POOL)  # half existing names, half anything from the pool
MODES = st.sampled_from((0o644, 0o600, 0o755, 0o4755, 0o2755, 0o000, 0o1777))
DATA = st.builds(Blob, st.integers(0, 255), st.sampled_from((0, 1, 100, 4096, 70_000)))
OFFSETS = st.sampled_from((0, 1, 4095, 65_536, 200_000))
LENGTHS = st.sampled_from((0, 1, 5_000, 65_537, 400_000))
IDS = st.sampled_from((0, 1000, 65534))
XNAMES = st.sampled_from(("user.a", "user.b", "user.new"))
XVALUES = st.sampled_from((b"", b"1", b"other", b"w" * 500))
XFLAGS = st.sampled_from((0, os.XATTR_CREATE, os.XATTR_REPLACE))
RENAME_FLAGS = st.sampled_from((0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE))
TARGETS = st.sampled_from(("a", "b/a", "../a", "../../a", "zz", DANGLING_ABSOLUTE, ".", "a/"))
TIMES = st.sampled_from((0, 1_000_000_000, 1_234_567_890_123_456_789, 4_102_444_800_000_000_001))
SLOTS = st.integers(0, 2)


class DiffMachine(RuleBasedStateMachine):
    oci = False

    def __init__(self) -> None:
        super().__init__()
        self.pair: DiffPair | None = None
        self.failed = False

    @initialize(target=KNOWN, stack=stack_strategy())
    def setup(self, stack: Stack) -> MultipleResults[str]:
        self.pair = DiffPair(stack, sut_stack=to_oci(stack) if self.oci else None,
                             oci=self.oci)
        names = sorted(p for p in visible(snapshot(self.pair.oracle.mnt)) if p)
        return multiple(*(names or ["a"]))

    def _do(self, op: str, /, **kw: Any) -> None:
        assert self.pair is not None
        try:
            self.pair.apply(op, **kw)
        except BaseException:
            self.failed = True
            raise

    def _open(self, slot: int) -> bool:
        assert self.pair is not None
        return slot in self.pair.oracle.fds and slot in self.pair.sut.fds

    # -- data --

    @rule(target=KNOWN, path=PATHS, excl=st.booleans(), mode=MODES)
    def create(self, path: str, excl: bool, mode: int) -> str:
        self._do("create", path=path, excl=excl, mode=mode)
        return path

    @rule(path=PATHS, offset=OFFSETS, data=DATA)
    def write(self, path: str, offset: int, data: Blob) -> None:
        self._do("write", path=path, offset=offset, data=data)

    @rule(path=PATHS, data=DATA)
    def append(self, path: str, data: Blob) -> None:
        self._do("append", path=path, data=data)

    @rule(path=PATHS, length=LENGTHS)
    def truncate(self, path: str, length: int) -> None:
        self._do("truncate", path=path, length=length)

    @rule(path=PATHS)
    def read(self, path: str) -> None:
        self._do("read", path=path)

    @rule(path=PATHS, follow=st.booleans())
    def stat(self, path: str, follow: bool) -> None:
        self._do("stat", path=path, follow=follow)

    @rule(path=st.one_of(st.just(""), PATHS))
    def readdir(self, path: str) -> None:
        self._do("readdir", path=path)

    @rule(path=PATHS)
    def readlink(self, path: str) -> None:
        self._do("readlink", path=path)

    # -- metadata --

    @rule(path=PATHS, mode=MODES)
    def chmod(self, path: str, mode: int) -> None:
        self._do("chmod", path=path, mode=mode)

    @rule(path=PATHS, uid=IDS, gid=IDS, follow=st.booleans())
    def chown(self, path: str, uid: int, gid: int, follow: bool) -> None:
        self._do("chown", path=path, uid=uid, gid=gid, follow=follow)

    @rule(path=PATHS, atime_ns=TIMES, mtime_ns=TIMES, follow=st.booleans())
    def utimens(self, path: str, atime_ns: int, mtime_ns: int, follow: bool) -> None:
        self._do("utimens", path=path, atime_ns=atime_ns, mtime_ns=mtime_ns, follow=follow)

    @rule(path=PATHS, name=XNAMES, value=XVALUES, flags=XFLAGS)
    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        self._do("setxattr", path=path, name=name, value=value, flags=flags)

    @rule(path=PATHS, name=XNAMES)
    def removexattr(self, path: str, name: str) -> None:
        self._do("removexattr", path=path, name=name)

    @rule(path=PATHS, name=XNAMES)
    def getxattr(self, path: str, name: str) -> None:
        self._do("getxattr", path=path, name=name)

    @rule(path=PATHS)
    def listxattr(self, path: str) -> None:
        self._do("listxattr", path=path)

    # -- namespace --

    @rule(target=KNOWN, path=PATHS, mode=st.sampled_from((0o755, 0o700, 0o1777)))
    def mkdir(self, path: str, mode: int) -> str:
        self._do("mkdir", path=path, mode=mode)
        return path

    @rule(path=PATHS)
    def rmdir(self, path: str) -> None:
        self._do("rmdir", path=path)

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        self._do("unlink", path=path)

    @rule(target=KNOWN, src=PATHS, dst=PATHS, flags=RENAME_FLAGS)
    def rename(self, src: str, dst: str, flags: int) -> str:
        self._do("rename", src=src, dst=dst, flags=flags)
        return dst

    @rule(target=KNOWN, src=PATHS, dst=PATHS)
    def link(self, src: str, dst: str) -> str:
        self._do("link", src=src, dst=dst)
        return dst

    @rule(target=KNOWN, path=PATHS, to=TARGETS)  # `target` names the bundle here
    def symlink(self, path: str, to: str) -> str:
        self._do("symlink", path=path, target=to)
        return path

    @rule(target=KNOWN, path=PATHS, mode=st.sampled_from((0o644, 0o600)))
    def mkfifo(self, path: str, mode: int) -> str:
        self._do("mkfifo", path=path, mode=mode)
        return path

    # -- open files --

    @rule(path=PATHS)
    def open_unlink_read(self, path: str) -> None:
        self._do("open_unlink_read", path=path)

    @rule(slot=SLOTS, path=PATHS, write=st.booleans())
    def open_keep(self, slot: int, path: str, write: bool) -> None:
        if not self._open(slot):
            self._do("open_keep", slot=slot, path=path, write=write)

    @rule(slot=SLOTS)
    def fd_read(self, slot: int) -> None:
        if self._open(slot):
            self._do("fd_read", slot=slot)

    @rule(slot=SLOTS, offset=OFFSETS, data=DATA)
    def fd_write(self, slot: int, offset: int, data: Blob) -> None:
        if self._open(slot):
            self._do("fd_write", slot=slot, offset=offset, data=data)

    @rule(slot=SLOTS)
    def fd_stat(self, slot: int) -> None:
        if self._open(slot):
            self._do("fd_stat", slot=slot)

    @rule(slot=SLOTS)
    def fd_close(self, slot: int) -> None:
        if self._open(slot):
            self._do("fd_close", slot=slot)

    # -- layers --

    @precondition(lambda self: self.pair is not None and self.pair.can_remount())
    @rule()
    def remount(self) -> None:
        assert self.pair is not None
        try:
            self.pair.remount()
        except BaseException:
            self.failed = True
            raise

    def teardown(self) -> None:
        if self.pair is None:
            return
        try:
            if not self.failed:
                self.pair.check_epoch()
        finally:
            self.pair.close()


class OciMachine(DiffMachine):
    oci = True


TestDiffOperations = DiffMachine.TestCase
TestDiffOperations.settings = diff_settings(8, stateful_step_count=STEPS)
TestDiffOperations = pytest.mark.timeout(1200)(TestDiffOperations)

TestDiffOperationsOciLayers = OciMachine.TestCase
TestDiffOperationsOciLayers.settings = diff_settings(3, stateful_step_count=STEPS)
TestDiffOperationsOciLayers = pytest.mark.timeout(1200)(TestDiffOperationsOciLayers)
TestDiffOperationsOciLayers = pytest.mark.skipif(
    SUT_KIND == ORACLE_KIND, reason="kernel overlayfs does not read the OCI encoding")(
    TestDiffOperationsOciLayers)
