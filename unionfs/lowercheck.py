"""Checking the lower cache's records ahead of their use, in a forked helper process.

A record of the lower cache (`lowercache`) is used only after one lstat of its layer directory
shows it unchanged. Inline, that lstat comes with the first lookup that needs the directory: in
a deep stack, with every layer holding the directory, a cold lookup pays one cold lstat per
layer (64 layers: 64 directory inodes read, most of the lookup's time). Layers do not change
while mounted, so the check is as good made at mount as at first use. `start` forks a helper
once the mount is ready (`mount.serve`): it lstats every record the layers' files hold, in the
order mounts first learnt them and every layer's record of a directory together, on another CPU,
and writes what it found in memory shared with the server, one byte per record (CURRENT, STALE,
or 0 while not checked yet). The server reads that byte where it would lstat; a record the
helper has not reached yet it checks itself, as before. So no answer rests on an unchecked
record, the helper only moves the check off the lookup's path.

The helper keeps only directory fds (the layers' own, opened beneath their roots, never through
a symlink: the same `Branch.dir_fd` the server uses); first thing, it closes every other fd it
inherited (/dev/fuse, a daemonizing parent's pipe, the caller's stdio, log files) and puts
/dev/null on stdin, stdout and stderr. It dies with the server (PDEATHSIG), runs only where a
CPU is otherwise idle (SCHED_IDLE), never runs the server's signal handlers, exit handlers or
finalizers (os._exit), is named `unionfs-check` (ps, top), and is reaped by the server as soon
as the server reads a result after it exited, or at unmount (`Ahead.stop`, which kills it if it
is still running). Not started with one CPU to run on (by affinity or a cgroup's quota: it would
take the CPU from the lookups it means to spare), for fewer than `MIN_LAYERS` layers or with few
records; at most `MAX_RECORDS` are checked ahead, each layer its share. A fork refused (a
cgroup's pids.max, say) leaves every check inline.
"""

from __future__ import annotations

import mmap
import os
import signal
import stat
from collections.abc import Sequence

from . import sys_linux as sl
from .log import Logger
from .lowercache import LayerCache

log = Logger(__name__)

NAME = b"unionfs-check"
"""The helper's name (comm: what ps and top show for it)."""

MIN_LAYERS = 8
"""Stacks of fewer lower layers (with a cache file) are checked inline: a lookup checks at most
that many directories, and the fork costs the server about 1 ms and copy-on-write faults
right after the mount, when the container's first requests come (copy-up and hot random
reads of the rootfs benchmark, 3 layers, came out 0.2-0.4 ms slower with the helper)."""

MIN_RECORDS = 16
"""Fewer records than this are checked inline (a fork costs more than their lstats)."""

MAX_RECORDS = 1 << 17
"""At most this many records are checked ahead (the rest inline): about a quarter of a second
of the helper's CPU here."""


class Ahead:
    """The running (or finished) helper of one mount."""

    def __init__(self, pid: int, mem: mmap.mmap, size: int) -> None:
        self.pid: int | None = pid
        self._mem = mem
        self._size = size  # the byte after the results: set when the helper is done

    @property
    def done(self) -> bool:
        return self._mem[self._size] != 0

    def poll(self) -> None:
        """Reap the helper if it finished and exited (called when a result is read)."""
        if self.pid is not None and self._mem[self._size]:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid = self.pid
            if pid:
                self.pid = None

    def stop(self) -> None:
        """Kill the helper if it still runs, and reap it."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = None


def start(caches: Sequence[LayerCache]) -> Ahead | None:
    """Fork the helper that checks the records CACHES loaded (None: too few layers or records
    to be worth it, or no process to be had: everything is checked inline then)."""
    work = [(cache, keys) for cache in caches if (keys := cache.ahead_work())]
    total = sum(len(keys) for _, keys in work)
    if len(work) < MIN_LAYERS or total < MIN_RECORDS:
        return None
    if total > MAX_RECORDS:  # each layer its share, in the order of its file
        share = MAX_RECORDS // len(work)
        work = [(cache, keys[:share]) for cache, keys in work]
        total = sum(len(keys) for _, keys in work)
    parent = os.getpid()
    try:
        mem = mmap.mmap(-1, total + 1)  # (anonymous, shared with the child)
        pid = os.fork()
    except OSError as e:  # (a cgroup's pids.max, say)
        log.info("lower cache checked inline: no helper (%s)", e.strerror or e)
        return None
    if pid == 0:  # pragma: no cover - the helper (its effects are tested)
        try:
            _helper(parent, work, mem)
        finally:
            os._exit(0)
    ahead = Ahead(pid, mem, total)
    view = memoryview(mem)
    offset = 0
    for cache, keys in work:
        cache.take_ahead(view[offset:offset + len(keys)], keys, ahead.poll)
        offset += len(keys)
    return ahead


def _helper(parent: int, work: list[tuple[LayerCache, tuple[bytes, ...]]],
            mem: mmap.mmap) -> None:  # pragma: no cover - runs in the forked helper
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    sl.set_pdeathsig(signal.SIGKILL)
    sl.set_name(NAME)
    if os.getppid() != parent:
        return  # (the server is gone already)
    _keep_only_directories()
    _idle_priority()
    offsets = []
    offset = 0
    for _, keys in work:
        offsets.append(offset)
        offset += len(keys)
    longest = max(len(keys) for _, keys in work)
    for i in range(longest):  # every layer's i-th record, then the next
        for (cache, keys), base in zip(work, offsets, strict=True):
            if i < len(keys):
                mem[base + i] = cache.check_ahead(keys[i])
    mem[offset] = 1


def _idle_priority() -> None:  # pragma: no cover - runs in the forked helper
    """Run only on a CPU nothing else wants (SCHED_IDLE; else the lowest niceness): the
    helper must not slow the work it means to spare, as the mount's first requests (what it
    has not checked yet the server checks when it needs it)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        try:
            os.nice(19)
        except OSError:
            pass


def _keep_only_directories() -> None:  # pragma: no cover - runs in the forked helper
    """Close every fd but directories; /dev/null on 0, 1 and 2."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                os.close(fd)
        except OSError:
            pass  # (the listing's own fd, closed by now)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    if null > 2:
        os.close(null)
