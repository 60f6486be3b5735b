"""The server's loggers (`unionfs.log`, and the patched pyfuse3's `LazyLogger`): what they emit,
in which format, and that a mount that has nothing to say never imports logging.

Each case runs in a fresh interpreter: whether `logging` was imported is the point."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers.mounts import start_unionfs

from .conftest import Stack, write

ROOT = Path(__file__).resolve().parents[2]
FMT = "unionfs: %(levelname)s %(message)s"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


def test_messages_below_warning_import_nothing() -> None:
    r = _python(f"""
        import sys
        from unionfs import log
        log.setup(log.WARNING, {FMT!r})
        lg = log.Logger("unionfs")
        lg.debug("not %s", "shown")
        lg.info("nor this")
        print("logging" in sys.modules)
        """)
    assert r.stdout.strip() == "False"
    assert r.stderr == ""


def test_a_warning_comes_out_in_the_configured_format() -> None:
    r = _python(f"""
        import sys
        from unionfs import log
        log.setup(log.WARNING, {FMT!r})
        lg = log.Logger("unionfs")
        lg.debug("hidden")
        lg.warning("cannot write %s: %s", "/x", "EACCES")
        lg.info("still hidden")  # logging is imported now: its level decides
        lg.error("and an error")
        """)
    assert r.stderr.splitlines() == ["unionfs: WARNING cannot write /x: EACCES",
                                     "unionfs: ERROR and an error"]


def test_exception_logs_the_traceback() -> None:
    r = _python(f"""
        from unionfs import log
        log.setup(log.WARNING, {FMT!r})
        try:
            1 / 0
        except ZeroDivisionError:
            log.Logger("unionfs").exception("unionfs bug in %s", "lookup")
        """)
    lines = r.stderr.splitlines()
    assert lines[0] == "unionfs: ERROR unionfs bug in lookup"
    assert "Traceback (most recent call last):" in lines
    assert lines[-1] == "ZeroDivisionError: division by zero"


def test_debug_level_logs_everything_at_once() -> None:
    r = _python(f"""
        import sys
        from unionfs import log
        log.setup(log.DEBUG, {FMT!r})
        print("logging" in sys.modules)
        log.Logger("unionfs").debug("lookup%r", (1, b"a"))
        """)
    assert r.stdout.strip() == "True"
    assert r.stderr.splitlines() == ["unionfs: DEBUG lookup(1, b'a')"]


def test_a_logging_configured_elsewhere_is_honoured() -> None:
    """Once anyone imported logging, every message goes to it and its levels decide (as
    `logging.getLogger` would), here without any `setup`."""
    r = _python("""
        import logging
        logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
        from unionfs import log
        log.Logger("unionfs.lowercache").debug("dropped by the level")
        log.Logger("unionfs.lowercache").info("kept")
        """)
    assert r.stderr.splitlines() == ["unionfs.lowercache INFO kept"]


def test_pyfuse3_messages_import_logging_late_and_take_our_format() -> None:
    r = _python(f"""
        import sys
        import pyfuse3
        import unionfs.mount  # (hands pyfuse3's loggers our configuration)
        from unionfs import log
        print("logging" in sys.modules)
        log.setup(log.WARNING, {FMT!r})
        pyfuse3.log.debug("Calling fuse_session_new")
        print("logging" in sys.modules)
        pyfuse3.log.error("fuse_lookup(): fuse_reply_* failed with %s", "ENOENT")
        """)
    assert r.stdout.split() == ["False", "False"]
    assert r.stderr.splitlines() == [
        "unionfs: ERROR fuse_lookup(): fuse_reply_* failed with ENOENT"]


def test_debug_mount_logs_requests(stack: Stack, tmp_path: Path) -> None:
    """`-d` through a real mount: every request on the server's stderr, in our format."""
    write(stack.lowers[0] / "hello", "hi")
    logf = tmp_path / "server.log"
    m = start_unionfs(stack.lowers, stack.upper, stack.work, stack.mnt, debug=True, log=logf)
    try:
        assert (stack.mnt / "hello").read_text() == "hi"
    finally:
        m.umount()
    lines = logf.read_text().splitlines()
    assert any(ln.startswith("unionfs: DEBUG lookup(1, b'hello'") for ln in lines), lines[:20]
    assert any(ln.startswith("unionfs: DEBUG read(") for ln in lines), lines[:20]
