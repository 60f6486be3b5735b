"""What the kernel caches for unionfs: directory listings (`dircache`, with stateless readdir)
and negative lookups, on real mounts.

With dircache on, unionfs answers the first opendir with ENOSYS and the kernel caches listings;
these tests check that warm walks really reach no handler, that every change is seen through the
cache, and that a reader resuming mid-listing neither repeats nor skips entries that stayed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import platform
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.util import catches_signal
from tests.helpers.mounts import Mount, unmount
from tests.unionfs.conftest import Stack, write
from unionfs.mountinfo import device_of
from unionfs.ops import dircache_supported

_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}[platform.machine()]
_libc = ctypes.CDLL(None, use_errno=True)

MODES = {"dircache": ("dircache=1",), "no-dircache": ("dircache=0",)}


def getdents(fd: int, size: int) -> list[bytes]:
    """One getdents64 call with a SIZE-byte buffer: the names it returned ([] at the end)."""
    buf = ctypes.create_string_buffer(size)
    n = _libc.syscall(_SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, pos, raw = [], 0, buf.raw[:n]
    while pos < n:
        reclen = struct.unpack_from("=QqH", raw, pos)[2]
        out.append(raw[pos + 19:pos + reclen].split(b"\0", 1)[0])
        pos += reclen
    return out


def requests(m: Mount, path: Path, seq: list[int]) -> dict[str, int]:
    """The server's request counters so far (SIGUSR1 dump, see unionfs.mount)."""
    assert m.server is not None
    deadline = time.monotonic() + 10
    while not catches_signal(m.server.pid, signal.SIGUSR1):
        assert time.monotonic() < deadline, "server never installed its SIGUSR1 handler"
        time.sleep(0.02)
    seq[0] += 1
    os.kill(m.server.pid, signal.SIGUSR1)
    while True:
        try:
            data = json.loads(path.read_text())
            if data["seq"] >= seq[0]:
                return dict(data["requests"])
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert time.monotonic() < deadline, "no stats dump"
        time.sleep(0.02)


def walk(root: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, ds, fs in os.walk(root) for n in ds + fs)


def test_setup_builds_the_patched_pyfuse3() -> None:
    # scripts/setup.sh installs pyfuse3 from the upstream sdist plus third_party's patch
    assert dircache_supported()
    assert "+unionfs." in importlib.metadata.version("pyfuse3")


@pytest.mark.parametrize("mode", MODES)
def test_a_warm_walk_reaches_no_directory_handler(stack: Stack, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  mode: str) -> None:
    for d in range(20):
        write(stack.lowers[d % 2] / f"d{d}" / "sub" / "f", "x")
        write(stack.lowers[1] / f"d{d}" / "g", "y")
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    seq = [0]
    with stack.mount(options=MODES[mode]) as m:
        first = walk(stack.mnt)
        before = requests(m, stats, seq)
        assert walk(stack.mnt) == first
        after = requests(m, stats, seq)
    dir_requests = sum(after.get(k, 0) - before.get(k, 0)
                       for k in ("opendir", "readdir", "releasedir"))
    if mode == "dircache":
        assert dir_requests == 0, (before, after)
        assert after.get("opendir", 0) <= 2  # answered ENOSYS, then never sent again
    else:
        assert dir_requests >= 3 * 41  # every directory: opendir, readdir(s), releasedir


@pytest.mark.parametrize("mode", MODES)
def test_changes_show_through_cached_listings(stack: Stack, mode: str) -> None:
    write(stack.lowers[1] / "d" / "low", "1")
    write(stack.lowers[0] / "d" / "mid", "2")
    write(stack.lowers[1] / "e" / "x", "3")
    with stack.mount(options=MODES[mode]):
        d, e = stack.mnt / "d", stack.mnt / "e"

        def ls(p: Path) -> list[str]:
            return sorted(os.listdir(p))

        assert ls(d) == ["low", "mid"]
        (d / "new").write_text("n")
        assert ls(d) == ["low", "mid", "new"]
        (d / "low").unlink()
        assert ls(d) == ["mid", "new"]
        os.rename(d / "mid", e / "mid")
        assert ls(d) == ["new"] and ls(e) == ["mid", "x"]
        os.mkdir(d / "sub")
        os.symlink("new", d / "link")
        os.link(d / "new", d / "hard")
        assert ls(d) == ["hard", "link", "new", "sub"]
        os.rmdir(d / "sub")
        os.rename(e, d / "sub")
        assert ls(d) == ["hard", "link", "new", "sub"] and ls(d / "sub") == ["mid", "x"]
        assert ls(stack.mnt) == ["d"]
        for n in ("hard", "link", "new"):
            os.unlink(d / n)
        os.unlink(d / "sub" / "mid")
        os.unlink(d / "sub" / "x")
        os.rmdir(d / "sub")
        assert ls(d) == []
        os.rmdir(d)
        os.mkdir(d)  # opaque now: nothing from below comes back
        assert ls(d) == [] and ls(stack.mnt) == ["d"]


@pytest.mark.parametrize("mode", MODES)
def test_a_reader_resuming_after_changes_sees_every_stable_entry_once(stack: Stack,
                                                                      mode: str) -> None:
    names = [f"entry-{i:04d}" for i in range(600)]
    for i, n in enumerate(names):
        write((stack.lowers[i % 2] if i % 3 else stack.upper) / "big" / n)
    with stack.mount(options=MODES[mode]):
        big = stack.mnt / "big"
        fd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
        try:
            seen = getdents(fd, 2048)
            assert 0 < len(seen) < 300
            unseen = [n for n in names if n.encode() not in seen]
            changed = set()
            for n in [*unseen[::7], *[s.decode() for s in seen[::5] if s.startswith(b"e")]]:
                os.unlink(big / n)
                changed.add(n)
            for n in unseen[1::11]:
                if n not in changed:
                    os.rename(big / n, big / (n + ".moved"))
                    changed.add(n)
            for i in range(50):
                (big / f"new-{i}").write_text("")
            while chunk := getdents(fd, 2048):
                seen += chunk
        finally:
            os.close(fd)
    got = [s.decode() for s in seen if s not in (b".", b"..")]
    assert len(got) == len(set(got)), "an entry came twice"
    missing = [n for n in names if n not in changed and n not in got]
    assert not missing, missing[:5]


def test_missing_names_are_cached_negatively_and_appear_when_created(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(stack.lowers[1] / "d" / "low", "1")
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    seq = [0]
    with stack.mount() as m:
        d = stack.mnt / "d"
        names = ["f", "g", "h", "s", "n", "e"]
        for _ in range(3):
            for n in names:
                assert not os.path.lexists(d / n)
        counts = requests(m, stats, seq)
        assert counts.get("lookup", 0) <= len(names) + 2  # once per name, not three times
        (d / "f").write_text("f")
        os.mkdir(d / "g")
        os.rename(d / "low", d / "h")
        os.symlink("f", d / "s")
        os.link(d / "f", d / "n")
        os.mknod(d / "e", 0o600 | 0o010000)  # a fifo
        assert sorted(os.listdir(d)) == sorted(names)
        for n in names:
            assert os.path.lexists(d / n)
        assert not os.path.lexists(d / "low")
        os.unlink(d / "f")
        assert not os.path.lexists(d / "f") and (d / "n").read_text() == "f"


def test_symlink_targets_are_cached_by_the_kernel(stack: Stack, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    os.symlink("target-one", stack.lowers[1] / "link")
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    seq = [0]
    with stack.mount() as m:
        for _ in range(5):
            assert os.readlink(stack.mnt / "link") == "target-one"
        assert requests(m, stats, seq).get("readlink", 0) == 1
        # a new target is a new symlink: the cached one must not show through
        os.unlink(stack.mnt / "link")
        os.symlink("target-two", stack.mnt / "link")
        assert os.readlink(stack.mnt / "link") == "target-two"
        os.rename(stack.mnt / "link", stack.mnt / "moved")
        os.symlink("target-three", stack.mnt / "link")
        assert os.readlink(stack.mnt / "link") == "target-three"
        assert os.readlink(stack.mnt / "moved") == "target-two"


@pytest.mark.parametrize("kib", [0, 1024, 4096])
def test_read_ahead_window_makes_streaming_reads_fewer_requests(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kib: int) -> None:
    write(stack.lowers[1] / "big", os.urandom(1 << 16) * 128)  # 8 MiB
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    seq = [0]
    with stack.mount(options=(f"readahead={kib}",)) as m:
        dev = device_of(str(stack.mnt))
        assert dev is not None
        # the server sets the window once it has answered FUSE_INIT (0 keeps the kernel's)
        deadline = time.monotonic() + 10
        while True:
            window = int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())
            if window == (kib or 128) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert window == (kib or 128)
        with open(stack.mnt / "big", "rb") as f:
            while f.read(1 << 20):
                pass
        reads = requests(m, stats, seq).get("read", 0)
    # reads are at most min(window, max_write = 1 MiB) each
    assert reads >= 8
    assert reads <= (64 if kib == 0 else 12), reads


def test_noopen_reads_reach_the_server_once_and_no_open_or_release_does(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        write(stack.lowers[i % 2] / "d" / f"f{i}", f"data {i}" * 100)
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    seq = [0]
    with stack.mount(options=("noopen=1",)) as m:
        d = stack.mnt / "d"
        for _ in range(3):
            for i in range(20):
                assert (d / f"f{i}").read_text() == f"data {i}" * 100
        counts = requests(m, stats, seq)
    assert counts.get("open", 0) <= 1  # answered ENOSYS once, never sent again
    assert counts.get("release", 0) == 0
    assert counts.get("read", 0) <= 20  # the page cache outlives each open


def test_noopen_writes_copy_up_at_the_first_write_and_keep_posix_semantics(
        stack: Stack) -> None:
    write(stack.lowers[1] / "a", "lower a")
    write(stack.lowers[1] / "b", "lower b")
    write(stack.lowers[1] / "c", "lower c " * 1000)
    with stack.mount(options=("noopen=1",)):
        m = stack.mnt
        fd = os.open(m / "a", os.O_WRONLY)  # opening for writing copies nothing up yet
        assert not (stack.upper / "a").exists()
        os.write(fd, b"UPPER")
        os.close(fd)
        assert (m / "a").read_text() == "UPPER a" and (stack.upper / "a").exists()
        assert (stack.lowers[1] / "a").read_text() == "lower a"
        with open(m / "b", "w") as f:  # O_TRUNC reaches the server as a truncation
            f.write("new b")
        assert (m / "b").read_text() == "new b"
        # a lower file written through an fd after its name is gone keeps its data there
        fd = os.open(m / "c", os.O_RDWR)
        os.unlink(m / "c")
        os.pwrite(fd, b"changed", 0)
        os.fsync(fd)
        assert os.pread(fd, 14, 0) == b"changed" + (b"lower c " * 2)[7:14]
        os.close(fd)
        assert not os.path.lexists(m / "c")
        assert (stack.lowers[1] / "c").read_text() == "lower c " * 1000
        # an upper file replaced while open stays readable and writable through the fd
        (m / "n").write_text("first")
        fd = os.open(m / "n", os.O_RDWR)
        (m / "n2").write_text("second")
        os.rename(m / "n2", m / "n")
        os.pwrite(fd, b"FIRST", 0)
        assert os.pread(fd, 5, 0) == b"FIRST"
        os.close(fd)
        assert (m / "n").read_text() == "second"
        assert os.listdir(stack.work / "work") == []


_STEPS_SCRIPT = r'''
import os, stat, sys
import pyfuse3, trio

class Ops(pyfuse3.Operations):
    requests = 0

    async def getattr(self, inode, ctx=None):
        Ops.requests += 1
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        a.attr_timeout = a.entry_timeout = 0
        return a

class Steps(trio.abc.Instrument):
    n = 0

    def before_task_step(self, task):
        if task.name.startswith("pyfuse-"):
            Steps.n += 1

async def main(mnt):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main, 1, 1)
        await trio.sleep(0.2)
        steps, reqs = Steps.n, Ops.requests
        await trio.to_thread.run_sync(lambda: [os.stat(mnt) for _ in range(300)])
        print(Steps.n - steps, Ops.requests - reqs)
        pyfuse3.terminate()

mnt = sys.argv[1]
pyfuse3.init(Ops(), mnt, ["fsname=steps"])
try:
    trio.run(main, mnt, instruments=[Steps()])
finally:
    pyfuse3.close(unmount=True)
'''


def test_the_single_worker_loop_steps_once_per_request(tmp_path: Path) -> None:
    """third_party patch item 4: with max_tasks=1 pyfuse3's loop waits for the FUSE fd without
    the read lock, so its task runs one step per request (three with the lock)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        out = subprocess.run([sys.executable, "-c", _STEPS_SCRIPT, str(mnt)], timeout=60,
                             capture_output=True, text=True, check=True).stdout
    finally:
        unmount(mnt)
    steps, reqs = map(int, out.split())
    assert reqs >= 300
    assert steps / reqs < 1.5, (steps, reqs)


def test_flush_is_answered_without_python(stack: Stack, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every close sends a flush (answered, so that close() can fail once the server died, see
    tests/faults test_close_after_the_server_died_fails); the patched pyfuse3 answers it in C
    (third_party patch item 5), so no flush request reaches the Python handlers."""
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    seq = [0]
    with stack.mount() as m:
        for i in range(20):
            with open(stack.mnt / f"f{i}", "wb") as fh:
                fh.write(b"x")
            (stack.mnt / f"f{i}").read_bytes()
        # releases are sent after close() returns: the last ones may still be on their way
        deadline = time.monotonic() + 10
        counts = requests(m, stats, seq)
        while counts.get("release", 0) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
            counts = requests(m, stats, seq)
    assert counts.get("release", 0) >= 40  # the closes reached the server
    assert counts.get("flush", 0) == 0, counts


@pytest.mark.parametrize("loop", ["direct", "trio"])
def test_the_request_loop_in_use(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 loop: str) -> None:
    """`loop=direct` (the default with the patched pyfuse3) serves from pyfuse3.main_blocking,
    `loop=trio` from pyfuse3's trio loop; both serve, count and dump stats on SIGUSR1."""
    write(stack.lowers[0] / "f", "1")
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    options = () if loop == "direct" else ("loop=trio",)
    with stack.mount(options=options) as m:
        assert (stack.mnt / "f").read_text() == "1"
        (stack.mnt / "g").write_text("2")
        counts = requests(m, stats, [0])
        dumped = json.loads(stats.read_text())
        assert dumped["loop"] == loop
        assert stat.S_IMODE(stats.stat().st_mode) == 0o644  # (the server's umask is 0)
    assert counts.get("lookup", 0) >= 2
    assert (stack.upper / "g").read_text() == "2"
    # third_party patch item 7: the direct loop calls the handlers' synchronous entry points
    # (no coroutine per request; opendir has none); the trio loop awaits the coroutines
    if loop == "direct":
        assert dumped["sync_requests"] == sum(counts.values()) - counts.get("opendir", 0), dumped
    else:
        assert dumped["sync_requests"] == 0, dumped


@pytest.mark.parametrize("loop", ["direct", "trio"])
def test_written_data_arrives_without_a_copy_on_the_direct_loop(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    """third_party patch item 7: a write's data reaches the synchronous handler as a view of
    libfuse's buffer (released after the call); pyfuse3's coroutine path copies it to bytes.
    Either way every byte lands."""
    stats = tmp_path / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    data = os.urandom(3 << 20) + b"tail"
    options = () if loop == "direct" else ("loop=trio",)
    with stack.mount(options=options) as m:
        with open(stack.mnt / "big", "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        requests(m, stats, [0])
        dumped = json.loads(stats.read_text())
    assert (stack.upper / "big").read_bytes() == data
    writes = dumped["requests"].get("write", 0)
    assert writes >= 1
    assert dumped["view_writes"] == (writes if loop == "direct" else 0), dumped

