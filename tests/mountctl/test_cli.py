"""The mountctl command line: store root selection, listings, errors, progress, check, rm -f."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import tarfile
import termios
import time
from pathlib import Path

from mountctl.cli import _ProgressBar
from mountctl.containers import Containers
from mountctl.store import Store
from tests.helpers.images import Image
from tests.mountctl.conftest import ArchiveFactory
from tests.mountctl.test_run_helpers import Mctl, cleanup, wait_line

MCTL = [sys.executable, "-m", "mountctl"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MCTL, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


def test_usage_errors_exit_2() -> None:
    p = run()
    assert p.returncode == 2 and "usage: mountctl" in p.stderr
    p = run("run")
    assert p.returncode == 2 and "the following arguments are required: image" in p.stderr
    p = run("run", "--driver", "zfs", "img")
    assert p.returncode == 2 and "invalid choice: 'zfs'" in p.stderr


def test_root_from_env_and_flag(tmp_path: Path, archive: ArchiveFactory, busybox: Image) -> None:
    env_root, flag_root = tmp_path / "env", tmp_path / "flag"
    p = run("import", str(archive("oci-tar", "none")), env={"MOUNTCTL_ROOT": str(env_root)})
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{busybox.id} busybox-test:latest (3 layers, 3 new)\n"
    assert Store(env_root).resolve("busybox-test").id == busybox.id
    p = run("--root", str(flag_root), "images", env={"MOUNTCTL_ROOT": str(env_root)})
    assert p.stdout.splitlines() == ["REPOSITORY   TAG   IMAGE ID   CREATED   LAYERS"]
    assert not flag_root.exists() or not any((flag_root / "images").glob("*.json"))


def test_images_inspect_rmi(tmp_path: Path, archive: ArchiveFactory, busybox: Image) -> None:
    root = str(tmp_path / "root")
    assert run("--root", root, "import", str(archive("docker-oci", "gzip")), "--name",
               "mine:1").returncode == 0
    p = run("--root", root, "import", str(archive("docker-classic", "gzip")))
    assert p.stdout.endswith("(3 layers, 0 new)\n")
    rows = [r.split() for r in run("--root", root, "images").stdout.splitlines()]
    assert rows[0] == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "LAYERS"]
    assert sorted((r[0], r[1], r[2], r[-1]) for r in rows[1:]) == [
        ("busybox-test", "latest", busybox.id[7:19], "3"), ("mine", "1", busybox.id[7:19], "3")]
    assert run("--root", root, "images", "-q").stdout == busybox.id[7:19] + "\n"
    doc = json.loads(run("--root", root, "inspect", "mine:1").stdout)
    assert doc["id"] == busybox.id and doc["config"]["config"]["User"] == "1000:1000"
    p = run("--root", root, "inspect", "nope")
    assert (p.returncode, p.stderr) == (1, "mountctl: no such image: nope\n")
    assert run("--root", root, "rmi", "mine:1").stdout == "Untagged: mine:1\n"
    p = run("--root", root, "rmi", "busybox-test", "nope")
    assert p.returncode == 1
    assert p.stdout == f"Untagged: busybox-test:latest\nDeleted: {busybox.id}\n"
    assert p.stderr == "mountctl: no such image: nope\n"


def test_import_shows_a_progress_bar_on_a_terminal(tmp_path: Path,
                                                   archive: ArchiveFactory) -> None:
    master, slave = pty.openpty()
    try:
        p = subprocess.run([*MCTL, "--root", str(tmp_path / "root"), "import",
                            str(archive("oci-dir", "gzip"))], stdout=subprocess.PIPE,
                           stderr=slave, timeout=60, check=False)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0
    text = out.decode()
    assert "\rimporting [" in text and "100.0%" in text and text.endswith("\r\n")
    # not on a pipe
    p2 = run("--root", str(tmp_path / "root2"), "import", str(archive("oci-dir", "gzip")))
    assert p2.stderr == ""


def test_progress_bar_output() -> None:
    buf = io.StringIO()
    bar = _ProgressBar(buf, "importing")
    bar(0, 0)
    bar(1 << 20, 4 << 20)
    bar(4 << 20, 4 << 20)
    bar.close()
    assert buf.getvalue().split("\r")[1:] == [
        "importing [#######                       ]  25.0% 1.0/4.0 MiB",
        "importing [##############################] 100.0% 4.0/4.0 MiB\n"]


def test_check_as_root() -> None:
    p = run("check")
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    assert lines[0].startswith("ok  user:") and "root, containers run rootful" in lines[0]
    assert any(line.startswith("ok  user namespaces:") for line in lines)
    assert any("/dev/fuse:" in line for line in lines)
    assert any("kernel overlayfs:" in line for line in lines)
    assert lines[-1].startswith("run will use: rootful mode: mount, pid, uts and ipc")


def test_ps_marks_a_vanished_supervisor_dead(tmp_path: Path, archive: ArchiveFactory) -> None:
    store = Store(tmp_path / "root")
    rec = store.import_image(archive("oci-tar", "gzip")).image
    cs = Containers(store)
    gone = subprocess.Popen(["true"])
    gone.wait()
    c = cs.create(rec.id, "busybox-test", "ghost", {"spec": {"argv": ["sh"]}})
    cs.update(c, status="running", pid=gone.pid, pid_start=1, started=time.time())
    out = run("--root", str(store.root), "ps").stdout.splitlines()
    assert "Dead (supervisor gone)" in out[1] and out[1].split()[-1] == "ghost"
    assert run("--root", str(store.root), "rm", "ghost").returncode == 0


def test_rm_force_stops_a_running_container_and_export_to_stdout(
        tmp_path: Path, archive: ArchiveFactory) -> None:
    m = Mctl(tmp_path / "root")
    Store(m.root).import_image(archive("oci-tar", "gzip"))
    try:
        p = m.popen("run", "--driver", "fuse", "--name", "busy", "-u", "0", "busybox-test",
                    "echo x > /data/x.txt; echo ready; sleep 100")
        wait_line(p, "ready")
        r = m("rm", "busy")
        assert r.returncode == 1 and "is running; stop it first or use rm -f" in r.stderr
        tar_bytes = subprocess.run(m.cmd("export", "busy", "-"), capture_output=True,
                                   timeout=60, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            assert tar.extractfile("data/x.txt").read() == b"x\n"  # type: ignore[union-attr]
        assert m.ok("rm", "-f", "busy").strip()
        p.communicate(timeout=30)
        assert p.returncode == 128 + 15
        assert list((m.root / "containers").iterdir()) == []
    finally:
        found = cleanup(m.root, m.mark)
    assert found == ([], [])



_WIDTH = """\
import json, shutil
from mountctl import cli
print(json.dumps([cli._columns(), shutil.get_terminal_size().columns]))
"""


def _widths(env: dict[str, str], columns: int | None) -> tuple[int, int]:
    """(ours, shutil's) in a child whose standard output is a pipe, or a terminal of COLUMNS."""
    if columns is None:
        out = subprocess.run([sys.executable, "-c", _WIDTH], capture_output=True, text=True,
                             env=env, timeout=60, check=True).stdout
    else:
        parent, child = pty.openpty()
        try:
            fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
            subprocess.run([sys.executable, "-c", _WIDTH], stdout=child, env=env, timeout=60,
                           check=True)
            out = os.read(parent, 4096).decode()
        finally:
            os.close(child)
            os.close(parent)
    ours, theirs = json.loads(out.strip().splitlines()[-1])
    return ours, theirs


def test_help_is_as_wide_as_argparse_would_make_it() -> None:
    """The parser finds the terminal's width itself (`cli._columns`, so that `run` does not
    import shutil): what shutil.get_terminal_size() says, with $COLUMNS set, invalid or zero,
    on a terminal of 97 columns, on one of 0 and without one."""
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    for columns_env, tty, want in [("61", None, 61), ("x", None, 80), ("0", None, 80),
                                   (None, None, 80), (None, 97, 97), ("61", 97, 61),
                                   ("0", 97, 97), (None, 0, 80)]:
        env = base if columns_env is None else {**base, "COLUMNS": columns_env}
        assert _widths(env, tty) == (want, want), (columns_env, tty)


_ENTRY = """\
import atexit, sys
atexit.register(lambda: print("teardown"))
sys.argv = ["mountctl", "--root", sys.argv[1], sys.argv[2]]
from mountctl.cli import entry
entry()
"""


def test_the_command_exits_without_the_interpreter_teardown(tmp_path: Path) -> None:
    """`mountctl` (cli.entry) flushes its output and exits at once: the interpreter's teardown
    (6 ms of every command) never runs, and the status is main's."""
    ok = subprocess.run([sys.executable, "-c", _ENTRY, str(tmp_path / "store"), "images"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("REPOSITORY") and "teardown" not in ok.stdout
    bad = subprocess.run([sys.executable, "-c", _ENTRY, str(tmp_path / "store"), "inspect"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "teardown" in bad.stdout  # (argparse's exit: the usual way)
    missing = subprocess.run(
        [sys.executable, "-c", _ENTRY.replace('sys.argv[2]]', 'sys.argv[2], "nope"]'),
         str(tmp_path / "store"), "inspect"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "nope" in missing.stderr
    assert "teardown" not in missing.stdout
