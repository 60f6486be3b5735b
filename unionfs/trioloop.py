"""The trio main loop (`-o loop=trio`): pyfuse3's own loop, with the signals and stats the
direct loop (`mount._serve_direct`, the default) handles itself.

Its own module so that trio is imported only by a server that runs this loop: importing it
costs about 50 ms of every start-up.
"""

from __future__ import annotations

import signal

import pyfuse3
import trio

from .mount import dump_stats, log, set_readahead
from .ops import UnionOperations


def run(ops: UnionOperations, stats_path: str | None, readahead_kib: int = 0,
        mountpoint: str = "") -> None:
    """Serve until pyfuse3's loop ends (unmounted, or SIGTERM/SIGINT/SIGHUP)."""
    trio.run(_serve, ops, stats_path, readahead_kib, mountpoint)


async def _serve(ops: UnionOperations, stats_path: str | None, readahead_kib: int = 0,
                 mountpoint: str = "") -> None:
    async with trio.open_nursery() as nursery:
        initialized = trio.Event()
        ops.on_init = initialized.set

        async def widen_readahead() -> None:
            # after the kernel applied FUSE_INIT's reply, which caps the window at 128 KiB
            await initialized.wait()
            set_readahead(mountpoint, readahead_kib)

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("signal %d: unmounting", signum)
                    pyfuse3.terminate()
                    return

        async def dump_on_sigusr1(path: str) -> None:
            seq = 0
            with trio.open_signal_receiver(signal.SIGUSR1) as sigs:
                async for _ in sigs:
                    seq += 1
                    try:
                        dump_stats(ops, path, seq)
                    except OSError as e:
                        log.warning("cannot write stats to %s: %s", path, e)

        nursery.start_soon(watch_signals)
        if readahead_kib:
            nursery.start_soon(widen_readahead)
        if stats_path:
            nursery.start_soon(dump_on_sigusr1, stats_path)
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()
