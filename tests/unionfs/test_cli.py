"""The command line and the mount lifecycle: fuse-overlayfs compatible options, clear errors,
daemonizing, mount(8) helper use, signals and clean unmounts."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.mounts import fs_type, is_mounted, unmount, wait_mounted

from .conftest import Stack, write

UNIONFS = [sys.executable, "-m", "unionfs"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UNIONFS, *args], capture_output=True, text=True, timeout=timeout)


def _opts(stack: Stack, extra: str = "") -> str:
    lowers = ":".join(str(p) for p in stack.lowers)
    return f"lowerdir={lowers},upperdir={stack.upper},workdir={stack.work}{extra}"


def test_help_documents_every_option() -> None:
    r = run("--help")
    assert r.returncode == 0
    for word in ("lowerdir=", "upperdir=", "workdir=", "-f", "-d", "timeout=", "writeback=",
                 "readahead=", "dircache=", "spin=", "allow_other", "--version"):
        assert word in r.stdout, word
    v = run("--version")
    assert v.returncode == 0 and v.stdout.startswith("unionfs ")


@pytest.mark.parametrize("case", [
    "no-lowerdir", "missing-lower", "lower-is-file", "upper-without-work", "work-without-upper",
    "foreign-workdir", "unknown-option", "upper-inside-lower", "missing-mountpoint",
    "bad-timeout", "bad-readahead", "bad-dircache", "bad-spin", "negative-spin", "too-many-args",
])
def test_bad_input_is_one_clear_line(stack: Stack, case: str, tmp_path: Path) -> None:
    lowers = ":".join(str(p) for p in stack.lowers)
    m = str(stack.mnt)
    args: list[str]
    if case == "no-lowerdir":
        args = ["-o", f"upperdir={stack.upper},workdir={stack.work}", m]
    elif case == "missing-lower":
        args = ["-o", f"lowerdir={tmp_path}/nope", m]
    elif case == "lower-is-file":
        f = write(tmp_path / "file", "x")
        args = ["-o", f"lowerdir={f}", m]
    elif case == "upper-without-work":
        args = ["-o", f"lowerdir={lowers},upperdir={stack.upper}", m]
    elif case == "work-without-upper":
        args = ["-o", f"lowerdir={lowers},workdir={stack.work}", m]
    elif case == "foreign-workdir":
        write(stack.work / "precious", "x")
        args = ["-o", _opts(stack), m]
    elif case == "unknown-option":
        args = ["-o", _opts(stack, ",frobnicate=1"), m]
    elif case == "upper-inside-lower":
        inner = stack.lowers[0] / "up"
        inner.mkdir()
        args = ["-o", f"lowerdir={lowers},upperdir={inner},workdir={stack.work}", m]
    elif case == "missing-mountpoint":
        args = ["-o", _opts(stack), str(tmp_path / "nomnt")]
    elif case == "bad-timeout":
        args = ["-o", _opts(stack, ",timeout=0"), m]
    elif case == "bad-readahead":
        args = ["-o", _opts(stack, ",readahead=lots"), m]
    elif case == "bad-dircache":
        args = ["-o", _opts(stack, ",dircache=maybe"), m]
    elif case == "bad-spin":
        args = ["-o", _opts(stack, ",spin=fast"), m]
    elif case == "negative-spin":
        args = ["-o", _opts(stack, ",spin=-5"), m]
    else:
        args = ["-o", _opts(stack), "a", "b", m]
    r = run(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(("unionfs:", "usage:")), r.stderr
    assert not is_mounted(stack.mnt)
    if case == "foreign-workdir":
        assert (stack.work / "precious").exists()


def test_workdir_on_another_file_system_is_refused(stack: Stack, tmp_path: Path) -> None:
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other)], check=True,
                   timeout=30)
    try:
        lowers = ":".join(str(p) for p in stack.lowers)
        r = run("-o", f"lowerdir={lowers},upperdir={stack.upper},workdir={other}",
                str(stack.mnt))
        assert r.returncode == 1
        assert "same file system" in r.stderr and "Traceback" not in r.stderr
        assert not is_mounted(stack.mnt)
    finally:
        unmount(other)


def test_busy_mountpoint_is_refused(stack: Stack) -> None:
    write(stack.lowers[0] / "f", "1")
    with stack.mount():
        r = run("-o", _opts(stack), str(stack.mnt))
        assert r.returncode == 1
        assert "busy" in r.stderr


def test_daemon_mode_returns_when_ready_and_umount_stops_server(stack: Stack) -> None:
    write(stack.lowers[1] / "f", "hello")
    # podman's form: trailing comma, generic options, source argument first
    r = run("-o", _opts(stack, ",rw,noatime,dev,suid,context=\"x\","), "unionfs",
            str(stack.mnt))
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(stack.mnt)
        assert fs_type(stack.mnt) == "fuse.unionfs"
        assert (stack.mnt / "f").read_text() == "hello"
        pids = _server_pids(stack.mnt)
        assert pids
    finally:
        subprocess.run(["umount", str(stack.mnt)], check=False, timeout=30)
    _wait_gone(pids)
    assert not is_mounted(stack.mnt)


def _server_pids(mnt: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"unionfs.*{mnt}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return
        time.sleep(0.05)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise AssertionError(f"server processes {pids} still alive after unmount")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(stack: Stack, sig: int) -> None:
    write(stack.lowers[0] / "f", "1")
    proc = subprocess.Popen([*UNIONFS, "-f", "-o", _opts(stack), str(stack.mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_mounted(stack.mnt, proc=proc)
        (stack.mnt / "new").write_text("x")
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert not is_mounted(stack.mnt)
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        unmount(stack.mnt)
    assert (stack.upper / "new").read_text() == "x"


def test_fusermount_unmount_stops_foreground_server(stack: Stack) -> None:
    proc = subprocess.Popen([*UNIONFS, "-f", "-o", _opts(stack), str(stack.mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(stack.mnt, proc=proc)
        subprocess.run(["fusermount3", "-u", str(stack.mnt)], check=True, timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        unmount(stack.mnt)


def test_killed_server_does_not_hang_callers(stack: Stack) -> None:
    write(stack.lowers[0] / "f", "1")
    proc = subprocess.Popen([*UNIONFS, "-f", "-o", _opts(stack), str(stack.mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(stack.mnt, proc=proc)
        proc.kill()
        proc.wait(timeout=30)
        probe = subprocess.run(["stat", str(stack.mnt / "f")], capture_output=True,
                               timeout=30)
        assert probe.returncode != 0  # ENOTCONN, not a hang
    finally:
        unmount(stack.mnt)
    assert not is_mounted(stack.mnt)


def test_mount_helper_and_fstab_style(stack: Stack) -> None:
    """mount -t fuse.unionfs runs mount.fuse3, which runs `unionfs unionfs MNT -o ...`."""
    if not Path("/usr/local/bin/unionfs").exists():
        pytest.fail("scripts/setup.sh links unionfs into /usr/local/bin; run it first")
    write(stack.lowers[0] / "f", "via mount(8)")
    r = subprocess.run(["mount", "-t", "fuse.unionfs", "unionfs", str(stack.mnt), "-o",
                        _opts(stack)], capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert fs_type(stack.mnt) == "fuse.unionfs"
        assert (stack.mnt / "f").read_text() == "via mount(8)"
    finally:
        unmount(stack.mnt)
    assert not is_mounted(stack.mnt)


def test_lowerdir_escapes_and_symlinked_branches(tmp_path: Path) -> None:
    odd = tmp_path / "we:ird,dir"
    odd.mkdir()
    write(odd / "f", "escaped")
    link = tmp_path / "link"
    os.symlink(odd, link)
    mnt = tmp_path / "m"
    mnt.mkdir()
    esc = str(odd).replace(":", "\\:").replace(",", "\\,")
    for lower in (esc, str(link)):
        r = run("-o", f"lowerdir={lower}", str(mnt))
        try:
            assert r.returncode == 0, r.stderr
            assert (mnt / "f").read_text() == "escaped"
        finally:
            unmount(mnt)


def test_mount_points_with_spaces_and_non_ascii_names(tmp_path: Path) -> None:
    lower = tmp_path / "low er"
    write(lower / "f", "x")
    mnt = tmp_path / "mnt é\tx"
    mnt.mkdir()
    r = run("-o", f"lowerdir={lower}", str(mnt))
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt) and fs_type(mnt) == "fuse.unionfs"
        busy = run("-o", f"lowerdir={lower}", str(mnt))
        assert busy.returncode == 1 and "busy" in busy.stderr
    finally:
        unmount(mnt)
    assert not is_mounted(mnt)


def test_fstab_entry(stack: Stack, tmp_path: Path) -> None:
    """An /etc/fstab line (here a private fstab file given to mount -T) mounts unionfs."""
    write(stack.lowers[1] / "f", "from fstab")
    fstab = tmp_path / "fstab"
    fstab.write_text(f"unionfs {stack.mnt} fuse.unionfs {_opts(stack)},noauto 0 0\n")
    r = subprocess.run(["mount", "-T", str(fstab), str(stack.mnt)], capture_output=True,
                       text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert fs_type(stack.mnt) == "fuse.unionfs"
        assert (stack.mnt / "f").read_text() == "from fstab"
    finally:
        unmount(stack.mnt)


def test_server_start_imports_only_what_the_default_loop_needs(tmp_path: Path) -> None:
    """Every mount starts a Python process, so what it imports is start-up time: trio (about
    50 ms, only the `loop=trio` server needs it), importlib.metadata (pyfuse3's version, 10 ms),
    ctypes.util (the C library's name), pickle and queue (pyfuse3 needs them only to refuse a
    pickle and for its first notification), json (the stats dump), platform, dataclasses
    (6 ms, and about 0.7 ms per class it generates) and hashlib (OpenSSL's libcrypto: about
    20 ms of a cold start; the lower cache's file names are SHA-256 from CPython's own module)
    stay out of the default server's imports and set-up, and so do logging (about 8 ms: a
    mount that is not debugging imports it only to emit a warning, see `unionfs.log`),
    argparse (4 ms: the forms mount programs use are parsed without it, `parse_simple`) and
    typing, with re, contextlib and warnings behind it (about 5 ms, and typing.NamedTuple
    more per class: `unionfs.tuples`; pyfuse3 is patched alike), and setuptools' distutils
    shim, which a line in the venv's site-packages imports into every Python started there
    (0.6-1 ms; scripts/setup.sh removes the line).
    (The patched pyfuse3 imports trio on first use; `loop=trio` is served and tested with real
    mounts in test_spin.py, test_kernel_caching.py and the unionfs-trio conformance target.)"""
    (tmp_path / "lower").mkdir()
    # the imports, the command line as `main` parses it, logging set up as it does, then the
    # union's set-up with a lower cache (which names its files)
    code = ("import sys, unionfs.cli, unionfs.mount, pyfuse3; "
            "from unionfs.union import Union; from unionfs.config import Config; "
            "from unionfs import log; "
            "args, parser = unionfs.cli.parse_args(['-o', 'lowerdir=/a,upperdir=/u', '-f', "
            "'/mnt']); assert parser is None and args.paths == ['/mnt'], args; "
            "log.setup(log.WARNING, '%(message)s'); log.Logger('unionfs').debug('x'); "
            f"u = Union(Config(lowers=({str(tmp_path / 'lower')!r},), mountpoint='/x', "
            f"lowercache={str(tmp_path / 'cache')!r})); "
            "assert u.lcaches and u.lcaches[0].path.endswith('.layer'); u.close(); "
            "print(' '.join(m for m in ('trio', 'importlib.metadata', 'ctypes.util', "
            "'pickle', 'queue', 'json', 'platform', 'dataclasses', 'hashlib', 'logging', "
            "'argparse', 'typing', 're', 'contextlib', 'warnings', '_distutils_hack') "
            "if m in sys.modules)); "
            "print(pyfuse3.__version__)")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    unwanted, version = r.stdout.splitlines()
    assert unwanted == ""
    assert version.startswith("3.5.0+unionfs.")


# -- the command line without argparse ----------------------------------------------------------

_TOKENS = ["-o", "-f", "-d", "-fd", "-df", "-of", "-o=x", "-olowerdir=/a", "--", "-", "-5",
           "-x", "--version", "--help", "-h", "-V", "--fore", "lowerdir=/a,upperdir=/u", "/mnt",
           "src", ""]


def _argparse_result(argv: list[str]) -> object:
    """What the argparse parser makes of ARGV: an `Args`, or the exit it asks for."""
    import contextlib
    import io

    from unionfs import cli
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            ns = cli.build_parser().parse_intermixed_args(argv)
    except SystemExit as e:
        return ("exit", e.code)
    return cli.Args(ns.options, ns.foreground, ns.debug, ns.paths)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_TOKENS), st.text("ab/=,-. ", max_size=5)),
                max_size=7))
def test_simple_parser_agrees_with_argparse(argv: list[str]) -> None:
    """Whatever `parse_simple` parses, argparse (what `--help` describes) parses the same."""
    from unionfs import cli
    simple = cli.parse_simple(argv)
    if simple is not None:
        assert _argparse_result(argv) == simple


@pytest.mark.parametrize("argv", [
    ["-o", "lowerdir=/a,upperdir=/u,workdir=/w", "/mnt"],  # podman's mount_program
    ["-f", "-o", "lowerdir=/a", "-o", "upperdir=/u", "/mnt"],  # mountctl; -o repeated
    ["overlay", "/mnt", "-o", "rw,lowerdir=/a", "-d"],  # mount(8): source first, intermixed
])
def test_simple_parser_takes_what_mount_programs_pass(argv: list[str]) -> None:
    from unionfs import cli
    args, parser = cli.parse_args(argv)
    assert parser is None
    assert args == _argparse_result(argv)


@pytest.mark.parametrize("argv", [["--help"], ["-V"], ["-o"], ["-olowerdir=/a", "/mnt"],
                                  ["-fd", "/mnt"], ["-x", "/mnt"], ["-o", "lowerdir=/a"]])
def test_other_command_lines_go_to_argparse(argv: list[str]) -> None:
    from unionfs import cli
    assert cli.parse_simple(argv) is None
    if argv == ["-olowerdir=/a", "/mnt"]:  # attached values are argparse's to parse
        args, parser = cli.parse_args(argv)
        assert parser is not None and args.options == ["lowerdir=/a"]


def _soft_open_files_limit(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no open files limit")


def test_the_server_raises_its_open_files_limit_to_the_hard_one(stack: Stack) -> None:
    """Every file the kernel has open is an fd in the server (and so is every removed directory
    it still holds): started with a soft limit of 256, the server serves with the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        with stack.mount() as m:
            assert m.server is not None
            got = _soft_open_files_limit(m.server.pid)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    want = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert got == (want, want)
