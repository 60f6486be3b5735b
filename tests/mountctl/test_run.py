"""mountctl run, rootful, for real: the busybox test image on unionfs (and kernel overlayfs).

Every test gets its own store with the busybox image imported, runs the real CLI as a
subprocess, and ends by checking that no mount under its store and no process of its runs is
left (the harness kills and unmounts them anyway, then fails the test).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import marshal
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountctl import lindex
from mountctl.store import Store
from tests.helpers.images import Image, malicious_image
from tests.mountctl.conftest import ArchiveFactory
from tests.mountctl.test_run_helpers import (
    Mctl,
    cleanup,
    leftovers,
    read_upper,
    unionfs_servers,
    wait_line,
)

FUSE = ("--driver", "fuse")


@pytest.fixture
def mc(tmp_path: Path, archive: ArchiveFactory) -> Iterator[Mctl]:
    root = tmp_path / "root"
    m = Mctl(root)
    Store(root).import_image(archive("docker-classic", "gzip"))
    yield m
    found = cleanup(root, m.mark)
    assert found == ([], []), f"left behind (mounts, processes): {found}"


def tree_digest(path: Path) -> str:
    """Names, types, modes, owners, sizes and contents of everything under `path`."""
    h = hashlib.sha256()
    for top, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(top) / name
            st = os.lstat(p)
            h.update(f"{p.relative_to(path)} {st.st_mode} {st.st_uid} {st.st_size} "
                     f"{st.st_mtime_ns}\n".encode())
            if os.path.isfile(p) and not os.path.islink(p):
                h.update(p.read_bytes())
    return h.hexdigest()


def test_default_command_from_image_config(mc: Mctl) -> None:
    # Entrypoint ["/bin/sh", "-c"], Cmd, Env GREETING, User 1000:1000, WorkingDir /data
    assert mc.ok("run", *FUSE, "busybox-test") == "hello from 1000:1000 in /data\n"


def test_exit_status_and_signal_death(mc: Mctl) -> None:
    p = mc("run", "--rm", *FUSE, "busybox-test", "echo out; echo err >&2; exit 7")
    assert (p.returncode, p.stdout, p.stderr) == (7, "out\n", "err\n")
    p = mc("run", "--rm", *FUSE, "busybox-test", "kill -9 $$")
    assert p.returncode == 128 + 9, p.stderr


def test_sigterm_to_mountctl_reaches_the_command(mc: Mctl) -> None:
    p = mc.popen("run", "--rm", *FUSE, "busybox-test",
                 "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done")
    wait_line(p, "ready")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert (p.returncode, out) == (3, "got TERM\n"), err


def test_sigint_and_sigterm_kill_a_command_without_handlers(mc: Mctl) -> None:
    # the command is not PID 1 (a reaper is), so default dispositions apply
    for sig in (signal.SIGINT, signal.SIGTERM):
        p = mc.popen("run", "--rm", *FUSE, "busybox-test", "echo ready; sleep 100")
        wait_line(p, "ready")
        start = time.monotonic()
        p.send_signal(sig)
        p.communicate(timeout=30)
        assert p.returncode == 128 + sig
        assert time.monotonic() - start < 10


def test_flags_override_the_image_config(mc: Mctl) -> None:
    out = mc.ok("run", "--rm", *FUSE, "-e", "GREETING=hey", "-e", "NEW=1", "-w", "/tmp",
                "-u", "0:0", "--hostname", "box", "busybox-test",
                'echo "$GREETING $NEW"; pwd; id -u; id -g; hostname; echo "$HOME"; '
                'echo "$PATH"')
    assert out.splitlines() == ["hey 1", "/tmp", "0", "0", "box", "/root",
                                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    # a user name resolved in the container's /etc/passwd, a new working directory created
    out = mc.ok("run", "--rm", *FUSE, "-u", "user", "-w", "/data/new/dir", "busybox-test",
                'echo "$(id -u) $(id -g) $HOME $(pwd)"')
    assert out == "1000 1000 /home/user /data/new/dir\n"
    # --entrypoint drops the image's Cmd; CMD words are passed through
    out = mc.ok("run", "--rm", *FUSE, "--entrypoint", "/bin/echo", "busybox-test", "a b", "c")
    assert out == "a b c\n"


def test_layers_whiteouts_and_opaque_dir(mc: Mctl) -> None:
    out = mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test",
                "ls -a /data; echo --; ls -a /opq; echo --; cat /data/hello.txt")
    data, opq, hello = out.split("--\n")
    # remove-me.txt is whited out by layer 2; no .wh. marker shows
    assert data.split() == [".", "..", "hello-link.txt", "hello.txt", "layer2.txt",
                            "layer3.txt"]
    assert opq.split() == [".", "..", "new.txt"]  # layer 2 made /opq opaque
    assert hello == "hello from layer 3\n"


def test_writes_land_in_the_upper_only(mc: Mctl) -> None:
    store = Store(mc.root)
    before = tree_digest(store.layers_dir)
    mc.ok("run", *FUSE, "--name", "w", "-u", "0", "busybox-test",
          "echo new > /data/new.txt; echo more >> /data/hello.txt; rm /data/layer2.txt; "
          "mkdir /data/d")
    assert tree_digest(store.layers_dir) == before
    upper = read_upper(mc.root, "w")
    assert (upper / "data/new.txt").read_text() == "new\n"
    assert (upper / "data/hello.txt").read_text() == "hello from layer 3\nmore\n"
    wh = os.lstat(upper / "data/layer2.txt")
    assert (wh.st_mode & 0o170000, wh.st_rdev) == (0o020000, 0)  # a 0/0 char device
    assert (upper / "data/d").is_dir()
    assert not (upper / "bin").exists()
    # the next container starts from the image again
    assert mc.ok("run", "--rm", *FUSE, "busybox-test", "ls /data/new.txt || echo gone") \
        .endswith("gone\n")


def test_ps_rm_and_rm_flag(mc: Mctl) -> None:
    p = mc("run", *FUSE, "--name", "keep", "busybox-test", "exit 3")
    assert p.returncode == 3
    mc.ok("run", "--rm", *FUSE, "--name", "gone", "busybox-test", "true")
    lines = mc.ok("ps").splitlines()
    assert lines[0].split()[:2] == ["CONTAINER", "ID"]
    assert len(lines) == 2 and "Exited (3)" in lines[1] and lines[1].split()[-1] == "keep"
    assert len(list((mc.root / "containers").iterdir())) == 1
    p = mc("run", *FUSE, "--name", "keep", "busybox-test", "true")
    assert p.returncode == 125 and "already used" in p.stderr
    assert mc.ok("rm", "keep").strip()
    assert mc.ok("ps").splitlines()[1:] == []
    assert list((mc.root / "containers").iterdir()) == []
    p = mc("rm", "keep")
    assert (p.returncode, p.stderr) == (1, "mountctl: no such container: keep\n")


def test_rmi_is_refused_while_a_container_exists(mc: Mctl) -> None:
    mc.ok("run", *FUSE, "--name", "user1", "busybox-test", "true")
    p = mc("rmi", "busybox-test")
    assert p.returncode == 1 and "is used by container" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    mc.ok("rm", "user1")
    assert "Deleted: sha256:" in mc.ok("rmi", "busybox-test")
    assert mc.ok("images").splitlines()[1:] == []


def test_export_and_commit_round_trip(mc: Mctl, tmp_path: Path) -> None:
    mc.ok("run", *FUSE, "--name", "ch", "-u", "0", "busybox-test",
          "rm /data/layer2.txt; echo new > /data/new.txt; ln /data/new.txt /data/link.txt; "
          "rm -rf /opq; mkdir /opq; echo fresh > /opq/fresh.txt; "
          "mv /home/user /home/moved; echo added > /home/moved/added.txt")
    out = tmp_path / "ch.tar"
    mc.ok("export", "ch", str(out))
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
    assert "data/.wh.layer2.txt" in members
    # hard links stay hard links (the first name in order carries the data)
    assert members["data/link.txt"].isreg() and members["data/link.txt"].size == 4
    assert members["data/new.txt"].islnk()
    assert members["data/new.txt"].linkname == "data/link.txt"
    assert names.index("opq/.wh..wh..opq") == names.index("opq") + 1
    # the renamed lower directory is flattened: opaque, with its lower content, and its origin
    # whited out
    assert names.index("home/moved/.wh..wh..opq") == names.index("home/moved") + 1
    assert {"home/moved/.profile", "home/moved/added.txt", "home/.wh.user"} <= set(names)
    assert members["home/moved"].uid == 1000
    # mount points made by the runner are not changes of the container
    assert not {"etc/hosts", "etc/hostname", "etc/resolv.conf"} & set(names)
    assert not any(n.startswith(("proc", "dev", "sys/")) for n in names)

    new_id = mc.ok("commit", "ch", "busybox-test:changed").split()[0]
    assert new_id.startswith("sha256:")
    script = "ls -a /data /opq /home /home/moved; cat /opq/fresh.txt /home/moved/.profile"
    got = mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test:changed", script)
    assert got.split("\n\n")[0].split()[1:] == [".", "..", "hello-link.txt", "hello.txt",
                                                "layer3.txt", "link.txt", "new.txt"]
    assert "/opq:\n.\n..\nfresh.txt\n" in got
    assert "/home:\n.\n..\nmoved\n" in got
    assert got.endswith("fresh\nexport PS1='$ '\n")
    rec = Store(mc.root).resolve("busybox-test:changed")
    assert len(rec.layers) == 4 and rec.config["config"]["User"] == "1000:1000"
    # the committed image also runs on kernel overlayfs
    assert mc.ok("run", "--rm", "--driver", "overlay", "-u", "0", "busybox-test:changed",
                 script) == got


def test_unionfs_server_killed_mid_run(mc: Mctl) -> None:
    p = mc.popen("run", *FUSE, "--name", "victim", "busybox-test",
                 "echo ready; while :; do cat /data/hello.txt >/dev/null; sleep 0.05; done")
    wait_line(p, "ready")
    servers = unionfs_servers(mc.root)
    assert len(servers) == 1
    start = time.monotonic()
    os.kill(servers[0], signal.SIGKILL)
    _, err = p.communicate(timeout=30)
    assert time.monotonic() - start < 15
    assert p.returncode == 125
    assert "mountctl: unionfs server died (killed by signal 9)" in err
    rec = json.loads((read_upper(mc.root, "victim").parent / "container.json").read_text())
    assert rec["status"] == "exited" and rec["exit_code"] == 125


def test_driver_overlay_and_auto(mc: Mctl) -> None:
    out = mc.ok("run", "--driver", "overlay", "--name", "o", "-u", "0", "busybox-test",
                "mount | head -1; ls -a /data /opq; echo x > /data/x")
    first, listing = out.split("\n", 1)
    assert first.startswith("overlay on / type overlay")
    assert listing.split() == ["/data:", ".", "..", "hello-link.txt", "hello.txt",
                               "layer2.txt", "layer3.txt", "/opq:", ".", "..", "new.txt"]
    assert (read_upper(mc.root, "o") / "data/x").read_text() == "x\n"
    mc.ok("run", "--name", "a", "busybox-test", "true")
    rec = json.loads((read_upper(mc.root, "a").parent / "container.json").read_text())
    assert rec["driver_used"] == "overlay"  # auto: kernel overlayfs mounts here as root


def test_system_mounts_inside(mc: Mctl) -> None:
    out = mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test",
                "ps -o pid,comm | tr -s ' '; hostname; grep -c \"$(hostname)\" /etc/hosts; "
                "echo x > /dev/null && echo devnull-ok; ls /dev/pts/ptmx >/dev/null && echo pts; "
                "touch /sys/x 2>/dev/null || echo sys-ro; grep -c ' /tmp tmpfs' /proc/mounts; "
                "test -s /etc/resolv.conf && echo resolv")
    lines = out.splitlines()
    assert lines[1].split() == ["1", "mountctl-init"]
    assert lines[2].split()[0] == "2"
    host = lines[-7]
    assert len(host) == 12 and all(c in "0123456789abcdef" for c in host)
    assert lines[-6:] == ["1", "devnull-ok", "pts", "sys-ro", "1", "resolv"]


def test_volumes(mc: Mctl, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from host\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    out = mc.ok("run", "--rm", *FUSE, "-u", "0", "-v", f"{shared}:/mnt/shared",
                "-v", f"{ro}:/data/ro:ro", "busybox-test",
                "cat /mnt/shared/in.txt; echo back > /mnt/shared/out.txt; "
                "touch /data/ro/x 2>/dev/null || echo ro")
    assert out == "from host\nro\n"
    assert (shared / "out.txt").read_text() == "back\n"
    p = mc("run", "--rm", *FUSE, "-v", f"{tmp_path}/missing:/x", "busybox-test", "true")
    assert p.returncode == 125 and "does not exist" in p.stderr


def test_errors_are_one_line_with_docker_statuses(mc: Mctl) -> None:
    cases = [
        (["--entrypoint", "/nonexistent"], 127, "cannot execute /nonexistent: command not "
                                                "found"),
        (["--entrypoint", "/data/hello.txt"], 126, "cannot execute /data/hello.txt"),
        (["-u", "nobody"], 125, "user 'nobody' not found in the container's /etc/passwd"),
        (["-w", "relative"], 125, "must be an absolute path"),
        (["-e", "=x"], 125, "invalid environment variable"),
    ]
    for flags, code, text in cases:
        p = mc("run", "--rm", *FUSE, *flags, "busybox-test")
        assert p.returncode == code, (flags, p.stderr)
        assert text in p.stderr and p.stderr.startswith("mountctl: "), p.stderr
        assert "Traceback" not in p.stderr
    p = mc("run", "--rm", *FUSE, "no-such-image")
    assert (p.returncode, p.stderr) == (125, "mountctl: no such image: no-such-image\n")
    assert list((mc.root / "containers").iterdir()) == []


@pytest.mark.parametrize("fmt", ["oci-dir", "docker-oci"])
def test_other_archive_formats_run(tmp_path: Path, archive: ArchiveFactory, busybox: Image,
                                   fmt: str) -> None:
    m = Mctl(tmp_path / "root")
    try:
        out = m.ok("import", str(archive(fmt, "zstd")), "--name", "other:1")  # type: ignore[arg-type]
        assert out.startswith(busybox.id) and "other:1" in out
        assert m.ok("run", "--rm", *FUSE, "other:1") == "hello from 1000:1000 in /data\n"
    finally:
        found = cleanup(m.root, m.mark)
    assert found == ([], [])


def test_tar_slip_archive_is_refused_by_import(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep\n")
    before = sorted(os.listdir(outside))
    m = Mctl(tmp_path / "root")
    for kind in ("dotdot", "symlink-parent", "hardlink-absolute"):
        path, bad = malicious_image(kind, str(outside), tmp_path / f"evil-{kind}.tar")
        p = m("import", str(path))
        assert p.returncode == 1, p.stderr
        assert p.stderr.startswith("mountctl: ") and repr(bad) in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    assert sorted(os.listdir(outside)) == before
    assert (outside / "secret").read_text() == "keep\n"
    assert m.ok("images").splitlines()[1:] == []


def test_container_root_is_confined(mc: Mctl) -> None:
    out = mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test",
                "mknod /blk b 8 0 2>/dev/null || echo no-mknod; "
                "mount -o remount,rw /sys 2>/dev/null || echo no-remount; "
                "umount /etc/hosts 2>/dev/null || echo no-umount; "
                "ls /proc/1/fd | wc -l; mount | head -1")
    lines = out.splitlines()
    assert lines[:3] == ["no-mknod", "no-remount", "no-umount"]
    assert int(lines[3]) <= 4  # PID 1 holds stdio and its error pipe, nothing of the host's
    assert "nodev" in lines[4].split("(")[1]


def test_killing_mountctl_takes_everything_down(mc: Mctl) -> None:
    p = mc.popen("run", *FUSE, "--name", "k", "busybox-test", "echo ready; sleep 100")
    wait_line(p, "ready")
    p.kill()  # SIGKILL: no cleanup code runs in mountctl itself
    p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while leftovers(mc.root, mc.mark) != ([], []):
        assert time.monotonic() < deadline, leftovers(mc.root, mc.mark)
        time.sleep(0.05)
    assert "Dead (supervisor gone)" in mc.ok("ps")
    mc.ok("rm", "k")


def test_pid_1_reaps_orphans(mc: Mctl) -> None:
    # the inner shell exits at once: its background sleep is orphaned to PID 1, which must
    # reap it when it exits (a PID 1 that only waited for its own child would leave a zombie)
    out = mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test",
                "sh -c 'sleep 0.2 & echo $! > /tmp/orphan'; p=$(cat /tmp/orphan); "
                "grep PPid /proc/$p/status | tr -d '\\t'; i=0; "
                "while [ -e /proc/$p ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
                "if [ -e /proc/$p ]; then cut -d' ' -f3 /proc/$p/stat; else echo reaped; fi")
    assert out == "PPid:1\nreaped\n"


def test_fuse_run_builds_checks_and_reuses_the_lower_index(mc: Mctl) -> None:
    """The first FUSE run of an image builds its lower index (mountctl/lindex.py); later runs
    reuse it; an unusable one is rebuilt; gc keeps it while its layers exist."""
    assert mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test", "ls /bin/sh") == "/bin/sh\n"
    found = sorted((mc.root / "lindex").glob("*.idx"))
    assert len(found) == 1
    idx = found[0]
    lowers = Store(mc.root).lowerdirs("busybox-test")
    assert lindex.ensure(mc.root, lowers) == idx
    before = idx.stat().st_mtime_ns
    assert mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test", "echo again") == "again\n"
    assert idx.stat().st_mtime_ns == before  # reused, not rebuilt
    idx.write_bytes(b"not an index")
    assert mc.ok("run", "--rm", *FUSE, "-u", "0", "busybox-test", "echo rebuilt") == "rebuilt\n"
    assert marshal.loads(idx.read_bytes())[0] == b"unionfs-lowerindex"
    assert lindex.gc(mc.root) == [] and idx.exists()


def test_run_imports_only_what_a_container_start_needs(mc: Mctl) -> None:
    """Every container start is a mountctl process, and what it imports is start-up time: the
    dataclasses module (with inspect and ast behind it, and about 0.7 ms per class it
    generates), hashlib (OpenSSL's libcrypto; secrets imports it too), tempfile (random,
    shutil's compressors), platform, typing and what importing and exporting images need
    stay out of `run` (`shutil` comes in for `--rm`'s removal, after the command ran). The
    real command, its imports profiled by Python itself (`PYTHONPROFILEIMPORTTIME`)."""
    mc.env["PYTHONPROFILEIMPORTTIME"] = "1"
    p = mc("run", "--name", "imports", *FUSE, "-u", "0", "busybox-test", "echo ran")
    assert p.returncode == 0 and p.stdout == "ran\n", p.stderr

    def imported(profile: str) -> set[str]:
        return {line.rsplit("|", 1)[1].strip() for line in profile.splitlines()
                if line.startswith("import time:") and "|" in line}

    mine = imported(p.stderr)
    assert {"mountctl.run", "mountctl.containers", "json"} <= mine  # the profile was taken
    unwanted = {"dataclasses", "inspect", "hashlib", "_hashlib", "secrets", "tempfile",
                "random", "platform", "ctypes.util",
                # typing (2 ms); image import and export: tarfile, gzip, shutil (its bz2 and
                # lzma), 7 ms together
                "typing", "tarfile", "gzip", "shutil", "bz2", "lzma", "mountctl.layers",
                "mountctl.export",
                # the server is forked, and newuidmap is only for rootless runs (3 ms)
                "subprocess",
                # the usual run command line is read by mountctl.fastargs (10 ms with argparse)
                "argparse", "gettext", "locale"}
    assert mine & unwanted == set()
    # the server (its profile is in its log) is forked, not exec'd: no second interpreter
    # start (encodings, site: 16 ms before its first import), nothing imported twice
    log = read_upper(mc.root, "imports").parent / "unionfs.log"
    server = imported(log.read_text())
    assert {"unionfs.cli", "unionfs.union", "pyfuse3"} <= server
    assert server & ({"encodings", "site", "runpy", "unionfs.layerindex"} | mine) == set()
    mc.ok("rm", "imports")
    # on kernel overlayfs, none of unionfs' own modules (the lower index and what it needs:
    # 4 ms) but the system calls' wrappers
    p = mc("run", "--rm", "--driver", "overlay", "-u", "0", "busybox-test", "echo ran")
    assert p.returncode == 0 and p.stdout == "ran\n", p.stderr
    overlay = imported(p.stderr)
    assert "mountctl.run" in overlay
    assert {m for m in overlay if m.startswith("unionfs.")} <= {
        "unionfs.sys_linux", "unionfs.tuples", "unionfs.atomicfile"}, overlay
    assert {"unionfs.layerindex", "unionfs.branch", "mountctl.lindex"} & overlay == set()


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
    return out


def test_the_server_keeps_no_fd_of_mountctl(mc: Mctl) -> None:
    """The forked server holds none of mountctl's fds (its signal pipe; a lock file would stay
    open, and locked, for the server's lifetime): standard input is /dev/null, output goes to
    its log, the rest is its own (/dev/fuse, the branches, libfuse's pipes)."""
    p = mc.popen("run", *FUSE, "--name", "fds", "busybox-test", "echo ready; sleep 100")
    try:
        wait_line(p, "ready")
        (server,) = unionfs_servers(mc.root)
        fds = _fd_targets(server)
        mine = _fd_targets(p.pid)
        log = str(read_upper(mc.root, "fds").parent / "unionfs.log")
        assert (fds[0], fds[1], fds[2]) == ("/dev/null", log, log), fds
        assert "/dev/fuse" in fds.values()
        assert any(t.startswith("pipe:") for t in mine.values())  # (the signal pipe)
        shared = set(fds.values()) & {t for t in mine.values() if t.startswith("pipe:")}
        assert shared == set(), (fds, mine)
        others = [t for n, t in fds.items() if n > 2]
        assert not [t for t in others if t.endswith((".json", ".lock", "unionfs.log"))], fds
    finally:
        p.kill()
        p.wait(timeout=30)
    mc.ok("rm", "-f", "fds")
