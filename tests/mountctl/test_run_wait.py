"""mountctl run waiting for its unionfs server's mount (`run._wait_mounted`): woken by the
mount table, the server's exit or a signal, never by a timer; and every way the wait can end.

The servers are real: unionfs itself, or a process that never mounts (`sleep`). Each case runs
in a child process with a private mount namespace, as `mountctl run` does (it waits in the
container's namespace): mounts elsewhere on the machine (other tests) then do not wake the
wait, so the number of times it read the mount table says whether it polled on a timer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")

REPO = Path(__file__).resolve().parents[2]

PRELUDE = """\
import json, os, signal, subprocess, sys, threading, time
from pathlib import Path
from mountctl import run as run_mod
from mountctl import syscalls as sc
from mountctl.containers import Container

sc.unshare(sc.CLONE_NEWNS)
sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
tmp = Path(sys.argv[1])
c = Container(tmp / "c", {"id": "0" * 64})
for d in (c.upper, c.work, c.merged, tmp / "lower"):
    d.mkdir(parents=True)
(tmp / "lower" / "hello").write_text("hi\\n")
reads = []
real_mounted_fs = run_mod._mounted_fs
def counted(path):
    reads.append(1)
    return real_mounted_fs(path)
run_mod._mounted_fs = counted
signals = run_mod._Signals()
signals.install()
out = {}
def sleeper():
    return subprocess.Popen(["sleep", "30"], start_new_session=True)
def wait_for(server, seconds):  # (out: the error and how long the wait took)
    union = run_mod._Union("fuse", c.merged, server)
    t0 = time.monotonic()
    try:
        run_mod._wait_mounted(union, server, signals, time.monotonic() + seconds)
    except run_mod.RunError as e:
        out["error"] = str(e)
    out["took"] = time.monotonic() - t0
"""


def _run(tmp_path: Path, body: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)
                        + "\nprint(json.dumps(out))\n", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout.splitlines()[-1]))


def test_the_mount_wakes_the_wait(tmp_path: Path) -> None:
    """The real server: the wait returns once its mount is there, having read the mount
    table when it changed, not every 2 ms of the server's start-up (30 ms and more: a timer
    would have read it 15 times)."""
    out = _run(tmp_path, """
        union = run_mod.start_unionfs([tmp / "lower"], c, signals)
        out["hello"] = (c.merged / "hello").read_text()
        out["reads"] = len(reads)
        union.teardown()
        out["server_gone"] = union.server.returncode is not None
        out["fds"] = sorted(os.listdir("/proc/self/fd"))
    """)
    assert out["hello"] == "hi\n"
    assert 1 <= out["reads"] <= 3, out
    assert out["server_gone"]


def test_a_server_that_exits_ends_the_wait_with_its_message(tmp_path: Path) -> None:
    out = _run(tmp_path, """
        t0 = time.monotonic()
        try:
            run_mod.start_unionfs([tmp / "nope"], c, signals)
        except run_mod.RunError as e:
            out["error"] = str(e)
        out["took"] = time.monotonic() - t0
    """)
    assert "could not mount the container's root: " in out["error"] and "nope" in out["error"]
    assert out["took"] < 10


def test_a_server_that_never_mounts_times_out(tmp_path: Path) -> None:
    """Nothing changes: the wait sleeps until its deadline (a read of the table before and one
    after, not one per 2 ms), then says so, and keeps no fd."""
    out = _run(tmp_path, """
        fds = sorted(os.listdir("/proc/self/fd"))
        server = sleeper()
        wait_for(server, 0.4)
        out["reads"] = len(reads)
        server.kill()
        server.wait()
        out["fds_kept"] = sorted(set(os.listdir("/proc/self/fd")) - set(fds))
    """)
    assert "did not mount the container's root" in out["error"]
    assert 0.35 < out["took"] < 5
    assert out["reads"] <= 3, out
    assert out["fds_kept"] == []


def test_sigterm_interrupts_the_wait(tmp_path: Path) -> None:
    """SIGTERM during the wait ends it at once; a signal that is only forwarded (SIGUSR1)
    wakes it and stays pending for the container."""
    out = _run(tmp_path, """
        server = sleeper()
        me = os.getpid()
        def later():
            time.sleep(0.1)
            os.kill(me, signal.SIGUSR1)
            time.sleep(0.1)
            os.kill(me, signal.SIGTERM)
        threading.Thread(target=later, daemon=True).start()
        wait_for(server, 20)
        out["pending"] = [int(s) for s in signals.pending]
        server.kill()
        server.wait()
    """)
    assert out["error"] == "interrupted while mounting"
    assert out["took"] < 5
    assert out["pending"] == [10, 15]  # SIGUSR1, SIGTERM


def test_a_server_that_refuses_its_command_line_exits_with_its_status(tmp_path: Path) -> None:
    """The forked server's own command-line parser exits (SystemExit): the process ends with
    that status and its usage message in the log, not a traceback nor mountctl's status."""
    out = _run(tmp_path, """
        log = tmp / "server.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        pid = os.fork()
        if pid == 0:
            run_mod._server_main(["--no-such-option"], fd, os.getppid())
        os.close(fd)
        out["status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out["log"] = log.read_text()
    """)
    assert out["status"] == 2, out
    assert "usage" in out["log"] and "Traceback" not in out["log"], out
