"""Mount lifecycle: init, serve, clean unmount, signals, and daemonizing.

`run(config)` returns only after the file system is unmounted. By default the server forks: the
parent returns once the mount is ready (or reports why it failed), the child serves in its own
session. SIGTERM, SIGINT and SIGHUP end the loop; the mount is always closed in `finally`.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Callable

import pyfuse3

from .atomicfile import write_atomically
from .config import Config
from .log import Logger, configure
from .mountinfo import device_of
from .ops import (
    UnionOperations,
    dircache_supported,
    direct_loop_supported,
    enable_dircache,
    enable_flush_direct,
    enable_noopen,
    enable_sync_handlers,
    flush_direct_supported,
    noopen_supported,
    spin_supported,
    sync_handlers_supported,
)
from .union import Union

log = Logger("unionfs")

# pyfuse3's messages in the format `log.setup` was given (the patched pyfuse3, like `log`,
# imports logging only when it has something to say)
_lazy_logger = getattr(getattr(pyfuse3, "_pyfuse3", None), "LazyLogger", None)
if _lazy_logger is not None:
    _lazy_logger.before_logging = configure

STATS_ENV = "UNIONFS_STATS_FILE"
"""When set, requests are counted and SIGUSR1 writes them as JSON to this file (benchmarks/)."""

GENERIC_FUSE_OPTIONS = frozenset({
    "ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
    "sync", "async", "dirsync",
})


def fuse_options(config: Config) -> set[str]:
    opts = {f"fsname={config.fsname}", "subtype=unionfs"}
    if config.default_permissions:
        opts.add("default_permissions")
    if config.allow_other:
        opts.add("allow_other")
    opts.update(o for o in config.fuse_options if o in GENERIC_FUSE_OPTIONS)
    if config.upper is None:
        opts.discard("rw")
        opts.add("ro")
    return opts


def dump_stats(ops: UnionOperations, path: str, seq: int) -> None:
    """Write the request counters atomically: {"pid", "seq", "requests", "bugs", "cpu_s"}."""
    import json  # (only the benchmark's stats dump needs it: not imported at every start)

    data = {"pid": os.getpid(), "seq": seq, **ops.stats()}
    # 0644 whatever the server's umask (none)
    write_atomically(path, json.dumps(data).encode(), 0o644, durable=False)


def spin_time(requested_us: int) -> int:
    """The spin the direct loop gets: none with one CPU to run on (the client needs that CPU
    to send the next request; the spin yields it, but each yield is a wasted system call),
    whether by affinity or by a cgroup's CPU quota."""
    if requested_us <= 0 or not spin_supported():
        return 0
    return requested_us if two_cpus() else 0


def two_cpus() -> bool:
    """Whether this process may run on two CPUs at once, by affinity and cgroup CPU quota."""
    if len(os.sched_getaffinity(0)) < 2:
        return False
    quota = cpu_quota()
    return quota is None or quota >= 2


def cpu_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
              ) -> float | None:
    """How many CPUs' worth of time this process's cgroups allow (the smallest quota of its
    cgroup and the ones above it: cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`); None when nothing limits it or it cannot be read."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found: list[float] = []
    files: tuple[str, ...]
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and not controllers:  # cgroup v2
            base, files = root, ("cpu.max",)
            if os.path.isdir(os.path.join(root, "unified")) and not os.path.exists(
                    os.path.join(root, "cgroup.controllers")):
                base = os.path.join(root, "unified")  # (hybrid: v2 mounted beside v1)
        elif "cpu" in controllers.split(","):
            base = os.path.join(root, controllers)
            if not os.path.isdir(base):
                base = os.path.join(root, "cpu")
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            d = os.path.join(base, *parts[:depth])
            q = _quota_at(d, files)
            if q is not None:
                found.append(q)
    return min(found) if found else None


def _quota_at(d: str, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            with open(os.path.join(d, files[0])) as f:
                quota, _, period = f.read().strip().partition(" ")
        else:
            with open(os.path.join(d, files[0])) as f:
                quota = f.read().strip()
            with open(os.path.join(d, files[1])) as f:
                period = f.read().strip()
        if quota in ("max", "-1") or not period:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _serve_direct(ops: UnionOperations, stats_path: str | None, readahead_kib: int = 0,
                  mountpoint: str = "") -> None:
    """Serve without trio (`pyfuse3.main_blocking`): requests are read in this thread and
    answered at once; signal handlers run between requests: SIGTERM/SIGINT/SIGHUP end the
    loop, SIGUSR1 dumps the stats."""
    seq = 0

    def end(signum: int, _frame: object) -> None:
        log.info("signal %d: unmounting", signum)
        pyfuse3.terminate_blocking()

    def dump(_signum: int, _frame: object) -> None:
        nonlocal seq
        seq += 1
        assert stats_path is not None
        try:
            dump_stats(ops, stats_path, seq)
        except OSError as e:
            log.warning("cannot write stats to %s: %s", stats_path, e)

    handlers: dict[int, Callable[[int, object], None]] = {
        signal.SIGTERM: end, signal.SIGINT: end, signal.SIGHUP: end}
    if stats_path:
        handlers[signal.SIGUSR1] = dump
    previous = {sig: signal.signal(sig, fn) for sig, fn in handlers.items()}
    # the loop waits on this pipe too: a signal arriving while no request does still runs
    # its handler at once (Python's C-level handler writes a byte to it)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    def widen_readahead() -> None:  # once the kernel applied FUSE_INIT's reply (128 KiB)
        set_readahead(mountpoint, readahead_kib)

    try:
        if ops.spin_us:
            pyfuse3.main_blocking(widen_readahead if readahead_kib else None, r, ops.spin_us)
        else:
            pyfuse3.main_blocking(widen_readahead if readahead_kib else None, r)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(r)
        os.close(w)
        for sig, old in previous.items():
            signal.signal(sig, old)


def set_readahead(mountpoint: str, kib: int) -> bool:
    """Widen the mount's read-ahead window (the kernel starts FUSE mounts at 128 KiB, so a
    streaming read costs a request per 128 KiB; reads of up to max_write, 1 MiB, are allowed).
    Needs write access to sysfs (root); returns whether it was set."""
    dev = device_of(mountpoint)
    if dev is None:
        return False
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        log.debug("read-ahead of %s left as it is: %s", mountpoint, e)
        return False
    return True


def raise_open_files_limit() -> None:
    """Let the server hold as many fds as it may: every file the kernel has open is one here,
    and so is every removed upper directory the kernel still holds (`Union._keep_gone`). The
    soft RLIMIT_NOFILE goes up to the hard one, as libfuse's passthrough examples and
    virtiofsd raise theirs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def serve(config: Config, ready: Callable[[], None] | None = None) -> int:
    """Mount and serve until unmounted or signalled. Returns the number of handler bugs."""
    # modes of new objects are exactly what callers ask for (their umask is applied per request)
    os.umask(0)
    raise_open_files_limit()
    union = Union(config)
    stats_path = os.environ.get(STATS_ENV) or None
    ops = UnionOperations(union, timeout=config.timeout, writeback=config.writeback,
                          debug=config.debug, count_requests=stats_path is not None,
                          dircache=config.dircache and dircache_supported(),
                          noopen=config.noopen and noopen_supported() and os.geteuid() == 0,
                          loop="direct" if config.loop == "direct" and direct_loop_supported()
                          else "trio")
    if ops.dircache:
        enable_dircache()
    if ops.noopen:
        enable_noopen()
    if flush_direct_supported() and not config.debug:  # (-d logs every flush)
        enable_flush_direct()
    if ops.loop == "direct":
        ops.spin_us = spin_time(config.spin_us)
    if ops.loop == "direct" and sync_handlers_supported():
        # (`-o loop=trio` keeps pyfuse3's coroutine path: the conformance target unionfs-trio
        # tests it)
        enable_sync_handlers()
    try:
        pyfuse3.init(ops, config.mountpoint, fuse_options(config))
    except BaseException:
        union.close()
        raise
    try:
        if ready is not None:
            ready()
        if config.lowercache_check == "ahead" and union.lcaches and two_cpus():
            try:
                union.check_ahead()  # (after `ready`: the fork is not part of mounting)
            except Exception:  # (only spares work: the mount goes on, checking inline)
                log.exception("the lower cache's helper failed to start")
        if ops.loop == "direct":
            _serve_direct(ops, stats_path, config.readahead_kib, config.mountpoint)
        else:
            from . import trioloop  # (trio is imported only for this loop)
            trioloop.run(ops, stats_path, config.readahead_kib, config.mountpoint)
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            union.close()
    return ops.bugs


def run(config: Config, on_error: Callable[[str], None], exit_when_mounted: bool = False) -> int:
    """Run the server in the foreground or daemonized, as the config says. EXIT_WHEN_MOUNTED:
    the daemonizing parent (the program `unionfs`) ends at once when the mount is ready,
    without the interpreter's teardown (about 15 ms of every mount here; nothing of that
    process is needed, the child serves the mount)."""
    if config.foreground:
        serve(config)
        return 0
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read()
        if msg == b"ok":
            if exit_when_mounted:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            return 0
        os.waitpid(pid, 0)
        on_error(msg.decode(errors="replace").strip() or "the server exited before mounting")
        return 1
    # child: a session of its own, stdio detached once the mount is ready
    os.close(r)
    os.setsid()

    def ready() -> None:
        os.write(w, b"ok")
        os.close(w)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    code = 0
    try:
        serve(config, ready)
    except BaseException as e:  # report to the parent if it is still waiting
        try:
            os.write(w, f"{e}".encode())
            os.close(w)
        except OSError:
            pass
        code = 1
    finally:
        sys.stdout.flush()
    os._exit(code)
