"""The lower cache's records checked ahead by a helper process (`unionfs/lowercheck.py`): the
server then lstats no cached layer directory itself and answers exactly what probing answers;
what the helper found stale is read afresh; what it has not reached yet is checked inline; the
helper keeps no fd but directories, runs idle, dies with the server, is reaped, and is not
started with one CPU or few layers; a fork refused or a failed start leaves the checks inline
and the mount serving; through a real mount, the second mount uses its results and shows the
tree kernel overlayfs shows."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import mounts as mounts_mod
from tests.helpers.mounts import mounted
from tests.helpers.spy import record_calls
from tests.unionfs.test_layerindex import _Probes as _Reads
from tests.unionfs.test_layerindex import _view
from tests.unionfs.test_lowercache import PATHS, _dump, _mkstack, _union, _view_ro
from unionfs import lowercache, lowercheck
from unionfs.union import Union

ROOT = os.geteuid() == 0
N = 8  # layers: the root, d and d/sub of each are 24 records (MIN_RECORDS is 16)


def _until(cond: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Wait until COND() is true, failing with WHAT after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _wait_done(u: Union) -> None:
    ahead = u.ahead
    assert ahead is not None, "no helper was started"
    _until(lambda: ahead.done, "the helper did not finish")


@contextlib.contextmanager
def _helped(lowers: list[Path], cache: Path, wait: bool = True) -> Iterator[Union]:
    """A union whose records a helper checks (WAIT: until it is done); closed after."""
    u = _union(lowers, cache)
    try:
        u.check_ahead()
        if wait:
            _wait_done(u)
        yield u
    finally:
        u.close()


def _learnt(scratch: Path) -> tuple[list[Path], Path]:
    lowers = _mkstack(scratch, N)
    (lowers[N - 1] / "d" / "sub" / "x").write_text("x")
    cache = scratch / "cache"
    _view_ro(lowers, cache)  # the first mount learns every layer's /, d and d/sub
    assert len(list(cache.glob("*.layer"))) == N
    return lowers, cache


def _ahead_view(lowers: list[Path], cache: Path) -> tuple[dict[bytes, object], int]:
    """The engine's answers with the records checked ahead (waited for), and how many of them
    it used."""
    with _helped(lowers, cache) as u:
        return _view(u, PATHS), sum(c.checked_ahead for c in u.lcaches)


def test_the_server_lstats_no_record_the_helper_checked(scratch: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    lowers, cache = _learnt(scratch)
    want = _view_ro(lowers, None)
    checked = record_calls(monkeypatch, lowercache.LayerCache, "_check")
    assert _view_ro(lowers, cache) == want  # inline: the control
    assert {rel for rel in checked if rel} == {b"d", b"d/sub"}, checked
    checked.clear()
    view, used = _ahead_view(lowers, cache)
    assert view == want
    # only each layer's root, which the union checks while it is made (before the helper)
    assert [rel for rel in checked if rel] == [], checked
    assert used == 2 * N, used  # d and d/sub of every layer


@pytest.mark.parametrize("change", ["add", "remove-dir", "opaque-marker"])
def test_what_the_helper_finds_stale_is_read_afresh(scratch: Path, change: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lowers, cache = _learnt(scratch)
    before = _view_ro(lowers, None)
    time.sleep(0.01)
    mid = lowers[3]
    if change == "add":
        (mid / "d" / "new").write_text("n")
    elif change == "remove-dir":
        for p in sorted((mid / "d").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (mid / "d").rmdir()
    else:
        (mid / "d" / "sub" / ".wh..wh..opq").touch()
    fresh = _view_ro(lowers, None)
    assert fresh != before, "the change must show (else the test proves nothing)"
    checked = record_calls(monkeypatch, lowercache.LayerCache, "_check")
    reads = _Reads(monkeypatch)
    view, used = _ahead_view(lowers, cache)
    assert view == fresh
    assert [rel for rel in checked if rel] == [], checked
    assert reads.scans or reads.infos, "the stale directory must be read again"
    assert used >= 2 * N - 2, used


def test_records_not_checked_yet_are_checked_inline(scratch: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    lowers, cache = _learnt(scratch)
    want = _view_ro(lowers, None)
    checked = record_calls(monkeypatch, lowercache.LayerCache, "_check")
    u = _union(lowers, cache)
    try:
        for c in u.lcaches:  # a helper that has not got anywhere yet
            keys = c.ahead_work()
            c.take_ahead(memoryview(bytearray(len(keys))), keys, lambda: None)
        assert _view(u, PATHS) == want
        assert {rel for rel in checked if rel} == {b"d", b"d/sub"}
        assert sum(c.checked_ahead for c in u.lcaches) == 0
    finally:
        u.close()


def test_results_are_not_used_for_a_file_read_again_after_a_save(scratch: Path) -> None:
    lowers, cache = _learnt(scratch)
    with _helped(lowers, cache) as u:
        c = u.lcaches[0]
        c._learnt[b"d"] = (0, 0, 0, None, None, {})  # (something to write)
        c.save()  # (the file is rewritten: positions of the old one mean nothing now)
        assert c._ahead is None and c._ahead_of is None
        assert c.listing(b"d") is None  # the bogus record written is checked inline: stale
        assert c.checked_ahead == 0


@pytest.mark.parametrize("layers", [2, N - 1])
def test_shallow_stacks_start_no_helper(scratch: Path, layers: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under MIN_LAYERS layers (or MIN_RECORDS records) the records are checked inline: the
    fork would cost the mount's first requests more than it spares them."""
    lowers = _mkstack(scratch, layers)
    cache = scratch / "cache"
    _view_ro(lowers, cache)
    assert layers < lowercheck.MIN_LAYERS
    if layers * 3 >= lowercheck.MIN_RECORDS:  # (enough records: the layers decide)
        monkeypatch.setattr(lowercheck, "MIN_LAYERS", layers)
        with _helped(lowers, cache, wait=False) as u:
            assert u.ahead is not None  # the control: started at MIN_LAYERS layers
        monkeypatch.undo()
    with _helped(lowers, cache, wait=False) as u:
        assert u.ahead is None


def test_no_process_to_be_had_means_inline_checks(scratch: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork refused (a cgroup's pids.max, say) leaves the mount as it is, checking inline."""
    lowers, cache = _learnt(scratch)
    want = _view_ro(lowers, None)

    def refuse() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refuse)
    checked = record_calls(monkeypatch, lowercache.LayerCache, "_check")
    with _helped(lowers, cache, wait=False) as u:
        assert u.ahead is None
        assert _view(u, PATHS) == want
    assert {rel for rel in checked if rel} == {b"d", b"d/sub"}


def test_at_most_max_records_are_checked_ahead(scratch: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer gets its share of MAX_RECORDS, in its file's order; the rest is inline."""
    lowers, cache = _learnt(scratch)
    want = _view_ro(lowers, None)
    monkeypatch.setattr(lowercheck, "MAX_RECORDS", 2 * N)  # two of each layer's three
    checked = record_calls(monkeypatch, lowercache.LayerCache, "_check")
    with _helped(lowers, cache) as u:
        assert [len(c._ahead_keys) for c in u.lcaches] == [2] * N
        assert _view(u, PATHS) == want
        used = sum(c.checked_ahead for c in u.lcaches)
    inline = [rel for rel in checked if rel]
    assert used + len(inline) == 2 * N and 0 < used < 2 * N, (used, inline)


def _slow_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a helper forked from now on wait before its first check (it runs a copy of this
    process: the patched class comes with it)."""
    real = lowercache.LayerCache.check_ahead

    def slow(self: lowercache.LayerCache, rel: bytes) -> int:
        time.sleep(60)
        return real(self, rel)

    monkeypatch.setattr(lowercache.LayerCache, "check_ahead", slow)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def test_the_helper_keeps_only_directories_runs_idle_and_is_stopped_and_reaped(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lowers, cache = _learnt(scratch)
    _slow_helper(monkeypatch)
    r, w = os.pipe()  # (as a daemonizing parent's: it reads until every writer closed it)
    log = os.open(scratch / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    u = _union(lowers, cache)
    try:
        u.check_ahead()
        assert u.ahead is not None and u.ahead.pid is not None
        pid = u.ahead.pid
        _until(lambda: not any(t.startswith("pipe:") or t.endswith("/log")
                               for t in _fd_targets(pid).values()),
               "the helper kept a pipe or the log")  # (until it closed them)
        targets = _fd_targets(pid)
        assert all(targets.get(fd) == "/dev/null" for fd in (0, 1, 2)), targets
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE  # (only where a CPU is idle)
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == "unionfs-check"
        for fd, target in targets.items():
            if fd > 2:
                assert os.path.isdir(f"/proc/{pid}/fd/{fd}"), (fd, target)
        assert not u.ahead.done
        u.close()  # kills and reaps it
        assert u.ahead.pid is None and not _alive(pid)
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    finally:
        u.close()
        for fd in (r, w, log):
            os.close(fd)


def test_a_finished_helper_is_reaped_when_its_results_are_read(scratch: Path) -> None:
    lowers, cache = _learnt(scratch)
    with _helped(lowers, cache) as u:
        assert u.ahead is not None
        pid = u.ahead.pid
        assert pid is not None
        _until(lambda: not _alive(pid), "the helper did not exit")  # (it exits after done)
        assert os.path.exists(f"/proc/{pid}"), "a zombie until reaped"
        _view(u, PATHS)
        assert u.ahead.pid is None  # reaped at the first result read after it exited
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


PARENT = """
import os, sys, time
from tests.unionfs.test_lowercheck import _slow_helper
from tests.unionfs.test_lowercache import _union
from pathlib import Path
import pytest
mp = pytest.MonkeyPatch()
_slow_helper(mp)
u = _union([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))
u.check_ahead()
print(u.ahead.pid, flush=True)
time.sleep(60)
"""


def test_the_helper_dies_with_the_server(scratch: Path) -> None:
    lowers, cache = _learnt(scratch)
    server = subprocess.Popen([sys.executable, "-c", PARENT, str(cache), *map(str, lowers)],
                              stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    pid = 0
    try:
        assert server.stdout is not None
        pid = int(server.stdout.readline())
        assert _alive(pid)
        server.kill()
        server.wait(10)
        _until(lambda: not _alive(pid), "the helper outlived its server", 10)
    finally:
        server.kill()
        server.wait(10)
        if pid and _alive(pid):  # (the test failed: leave no sleeping helper behind)
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not ROOT or not os.path.exists("/dev/fuse"), reason="needs root and FUSE")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("how", ["ahead", "inline", "one-cpu"])
def test_mounted_second_mount(scratch: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount after one that learnt the layers: with the default options it uses the helper's
    checks (its stats say so), inline or with one CPU it does not; the tree is always the one
    kernel overlayfs shows."""
    stats = scratch / "stats.json"
    monkeypatch.setenv("UNIONFS_STATS_FILE", str(stats))
    lowers = _mkstack(scratch, N)
    (lowers[N - 1] / "d" / "sub" / "deep").write_text("deep")
    os.mknod(lowers[2] / "d" / "only5", 0o600 | stat.S_IFCHR, 0)  # (overlayfs' whiteout)
    cache = scratch / "cache"
    mnt = scratch / "mnt"

    def tree() -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for dirpath, dirnames, filenames in os.walk(mnt):
            rel = os.path.relpath(dirpath, mnt)
            out.update({os.path.join(rel, d): None for d in dirnames})
            out.update({os.path.join(rel, f): Path(dirpath, f).read_text() for f in filenames})
        return out

    with mounted("overlay", lowers, None, None, mnt):
        want = tree()
    assert "d/only5" not in want and want["d/sub/deep"] == "deep"
    opts = [f"lowercache={cache}"] + (["lowercache_check=inline"] if how == "inline" else [])
    with mounted("unionfs", lowers, None, None, mnt, opts):
        assert tree() == want
    cpus = os.sched_getaffinity(0)
    if how == "one-cpu":
        os.sched_setaffinity(0, {min(cpus)})  # (the server inherits it)
    try:
        with mounted("unionfs", lowers, None, None, mnt, opts) as m:
            assert m.server is not None
            server = m.server.pid
            if how == "ahead":  # until its helper is done (a zombie until a result is read)
                _until(lambda: (kids := _children(server)) and not any(map(_alive, kids)),
                       "no helper, or not done")
            else:
                time.sleep(0.2)  # (a helper, if one were started, would be done by then)
                assert _children(server) == []
            assert tree() == want
            used = _dump(m, stats)["lowercache_checked_ahead"]
    finally:
        os.sched_setaffinity(0, cpus)
    if how == "ahead":
        assert used >= 2 * N, used
    else:
        assert used == 0, used


BROKEN_HELPER = """
import sys
from unionfs import union
def broken(self):
    raise RuntimeError("a bug in the helper's start")
union.Union.check_ahead = broken
from unionfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not ROOT or not os.path.exists("/dev/fuse"), reason="needs root and FUSE")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_helper_that_fails_to_start_costs_the_mount_nothing(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lowers, cache = _learnt(scratch)
    mnt = scratch / "mnt"
    log = scratch / "server.log"
    monkeypatch.setattr(mounts_mod, "unionfs_cmd", lambda: [sys.executable, "-c", BROKEN_HELPER])
    with mounted("unionfs", lowers, None, None, mnt, [f"lowercache={cache}"], log=log) as m:
        assert sorted(os.listdir(mnt / "d")) == ["only0", "only1", "only2", "only3", "only4",
                                                 "only5", "only6", "only7", "sub"]
        assert (mnt / "d" / "sub" / "x").read_text() == "x"
        assert m.server is not None and m.server.poll() is None
    text = log.read_text()
    assert "the lower cache's helper failed to start" in text and "a bug in the helper" in text

