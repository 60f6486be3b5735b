"""podman 4 with unionfs as the overlay driver's mount_program (DESIGN.md section 5).

Each test has a private containers-storage: a storage.conf under tmp_path (driver "overlay",
graphroot and runroot beside it, `[storage.options.overlay] mount_program`), passed to podman with
CONTAINERS_STORAGE_CONF; podman also gets a private --tmpdir and --network-config-dir, so nothing
of the host's podman state is read or changed. (podman 4.3 ignores the conf's driver options when
--root/--runroot are given on the command line, so the paths are set in the conf only.)

The mount_program is a small wrapper written by the test: it records its arguments (one JSON
line per call) and execs unionfs. By default that is this checkout's unionfs (`python -m unionfs`
with the interpreter running the tests); UNIONFS_PODMAN_PROGRAM=/usr/local/bin/unionfs (or
another path) makes the wrapper exec that program instead (/usr/local/bin/unionfs is whatever
checkout last ran scripts/setup.sh, so it is not the default).

The flow, without a container runtime (`podman run` fails on this machine for reasons of its
own): import a busybox rootfs tar, create a container, `podman mount` it (a fuse.unionfs mount),
write a file and delete a lower file through the mount, check `podman diff`, `podman umount`,
`podman commit`, then create and mount a container of the committed image and see both changes.
Run with podman's default mount options, with `mountopt = "nodev,metacopy=on"` (the form of many
distributions' storage.conf) and with unionfs' own `lowerindex=auto,lowerindex_check=roots`
through mountopt (the index of the image is built after the first unmount and used by the next
mount). A 10-layer image (loaded from a docker-archive) is mounted twice with a private lower
cache: the second mount's helper checks the layers ahead (`unionfs/lowercheck.py`) without
holding podman up or outliving the umount. Teardown: podman umount/rm/rmi and `system reset` of
the private storage, then anything still mounted below tmp_path is unmounted and any server
started for it killed (by pid, found by its command line naming this test's directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.images import (
    Entry,
    busybox_layers,
    layer_tar,
    make_image,
    write_docker_archive,
)
from tests.helpers.mounts import fs_type, is_mounted, mount_points, unmount

pytestmark = pytest.mark.podman

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "rm", "mkdir", "true")
PODMAN_TIMEOUT = 180.0


def build_rootfs_tar(dest: Path) -> Path:
    """A busybox root file system as an uncompressed tar (uid 0, fixed mtimes)."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, kind: bytes, data: bytes = b"", mode: int = 0o644,
            target: str = "") -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = kind, mode, 1_700_000_000
        if kind == tarfile.SYMTYPE:
            ti.linkname = target
        if kind == tarfile.REGTYPE:
            ti.size = len(data)
        members.append((ti, data if kind == tarfile.REGTYPE else None))

    for d in ("bin", "etc", "tmp", "data", "data/sub"):
        add(d, tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
    add("bin/busybox", tarfile.REGTYPE, BUSYBOX.read_bytes(), 0o755)
    for a in APPLETS:
        add(f"bin/{a}", tarfile.SYMTYPE, target="busybox")
    add("etc/passwd", tarfile.REGTYPE, b"root:x:0:0:root:/root:/bin/sh\n")
    add("data/keep.txt", tarfile.REGTYPE, b"kept\n")
    add("data/remove-me.txt", tarfile.REGTYPE, b"to be removed\n")
    add("data/sub/deep.txt", tarfile.REGTYPE, b"deep\n")
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return dest


@pytest.fixture(scope="module")
def rootfs_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.is_file():
        pytest.skip("needs /bin/busybox (Debian package busybox-static)")
    return build_rootfs_tar(tmp_path_factory.mktemp("rootfs") / "busybox-rootfs.tar")


WRAPPER = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
target = {target!r}
os.execv(target[0], target + sys.argv[1:])
"""


@dataclass
class Podman:
    root: Path
    env: dict[str, str]
    argv_log: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        podman = shutil.which("podman")
        assert podman is not None
        cmd = [podman, "--tmpdir", str(self.root / "libpod-tmp"), "--network-config-dir",
               str(self.root / "networks"), "--events-backend", "none", "--cgroup-manager",
               "cgroupfs", *args]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                           timeout=PODMAN_TIMEOUT, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {r.returncode}:\n{r.stderr}")
        return r

    def calls(self) -> list[list[str]]:
        if not self.argv_log.exists():
            return []
        return [json.loads(x) for x in self.argv_log.read_text().splitlines() if x.strip()]

    def mount_call(self, merged: Path) -> list[str]:
        found = [c for c in self.calls() if c and c[-1] == str(merged)]
        assert found, f"no mount_program call for {merged}: {self.calls()}"
        return found[-1]


def _servers_for(root: Path) -> list[int]:
    """Pids of processes whose command line names ROOT (the unionfs servers podman started)."""
    key = os.fsencode(str(root))
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if key in cmdline and b"unionfs" in cmdline:
            pids.append(int(d))
    return pids


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}")
                 and not open(f"/proc/{p}/stat").read().split(") ")[1].startswith("Z")]
    return alive


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    return [mp for mp, _ in mount_points() if mp.startswith(prefix)]


AUTOINDEX = "lowerindex=auto,lowerindex_check=roots,lowercache={lcache}"


@pytest.fixture(params=["", "nodev,metacopy=on", AUTOINDEX],
                ids=["default-mountopt", "mountopt", "autoindex"])
def podman(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.skip("needs podman")
    root = tmp_path / "containers"
    root.mkdir()
    argv_log = root / "mount_program.calls"
    target = os.environ.get("UNIONFS_PODMAN_PROGRAM", "").strip()
    target_cmd = [target] if target else [sys.executable, "-m", "unionfs"]
    wrapper = root / "mount_program"
    wrapper.write_text(WRAPPER.format(python=sys.executable, log=str(argv_log),
                                      target=target_cmd))
    wrapper.chmod(0o755)
    opts = request.param.format(lcache=root / "lcache")
    mountopt = f'mountopt = "{opts}"\n' if opts else ""
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\n'
                    f'runroot = "{root / "run"}"\n\n[storage.options.overlay]\n'
                    f'mount_program = "{wrapper}"\n{mountopt}')
    env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf))
    pm = Podman(root, env, argv_log)
    try:
        info = pm.run("info", "--format", "{{json .Store.GraphOptions}}").stdout
        assert str(wrapper) in info, f"podman did not take the mount_program: {info}"
        yield pm
    finally:
        for args in (("umount", "--all", "--force"), ("rm", "--all", "--force"),
                     ("rmi", "--all", "--force"), ("system", "reset", "--force")):
            with contextlib.suppress(Exception):
                pm.run(*args, check=False)
        for mp in sorted(_mounts_below(tmp_path), key=len, reverse=True):
            unmount(mp)
        left = _wait_gone(_servers_for(root), 10)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(left, 10)
        shutil.rmtree(root, ignore_errors=True)
    assert not _mounts_below(tmp_path), f"mounts left: {_mounts_below(tmp_path)}"
    assert not left, f"unionfs servers outlived their mounts: {left}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_podman_create_mount_commit_with_unionfs(podman: Podman, rootfs_tar: Path) -> None:
    pm = podman
    pm.run("import", str(rootfs_tar), "localhost/unionfs-test:base")
    cid = pm.run("create", "--network", "none", "localhost/unionfs-test:base",
                 "/bin/sh").stdout.strip()
    merged = Path(pm.run("mount", cid).stdout.strip())
    assert fs_type(merged) == "fuse.unionfs", f"{merged} is a {fs_type(merged)} mount"
    call = pm.mount_call(merged)
    print("podman ran the mount program as:", call)
    assert call[0] == "-o" and "lowerdir=" in call[1] and "upperdir=" in call[1], call
    assert _sha(merged / "bin" / "busybox") == _sha(BUSYBOX)
    assert os.readlink(merged / "bin" / "sh") == "busybox"
    assert (merged / "data" / "keep.txt").read_text() == "kept\n"
    servers = _servers_for(merged)
    assert servers, "no unionfs server process for the mount"

    (merged / "data" / "new.txt").write_text("new\n")
    (merged / "data" / "remove-me.txt").unlink()
    assert sorted(os.listdir(merged / "data")) == ["keep.txt", "new.txt", "sub"]
    changes = pm.run("diff", cid).stdout.split("\n")
    assert "A /data/new.txt" in changes and "D /data/remove-me.txt" in changes, changes

    pm.run("umount", cid)
    assert not is_mounted(merged)
    assert _wait_gone(servers, 10) == [], "the server outlived podman umount"
    if "lowerindex=auto" in call[1]:  # the options of storage.conf's mountopt reached unionfs
        # the lower index of the image was built after the unmount: the next mount uses it
        assert len(list((pm.root / "lcache").glob("*.index"))) == 1
        merged = Path(pm.run("mount", cid).stdout.strip())
        assert (merged / "data" / "new.txt").read_text() == "new\n"
        assert (merged / "data" / "sub" / "deep.txt").read_text() == "deep\n"
        servers = _servers_for(merged)
        pm.run("umount", cid)
        assert _wait_gone(servers, 10) == []

    pm.run("commit", cid, "localhost/unionfs-test:committed")
    cid2 = pm.run("create", "--network", "none", "localhost/unionfs-test:committed",
                  "/bin/sh").stdout.strip()
    merged2 = Path(pm.run("mount", cid2).stdout.strip())
    assert fs_type(merged2) == "fuse.unionfs"
    lowers = pm.mount_call(merged2)[1].split("lowerdir=", 1)[1].split(",", 1)[0]
    assert ":" in lowers, f"the committed image should have two layers: {lowers}"
    assert (merged2 / "data" / "new.txt").read_text() == "new\n"
    assert not (merged2 / "data" / "remove-me.txt").exists()
    assert (merged2 / "data" / "keep.txt").read_text() == "kept\n"
    assert (merged2 / "data" / "sub" / "deep.txt").read_text() == "deep\n"
    assert _sha(merged2 / "bin" / "busybox") == _sha(BUSYBOX)
    pm.run("umount", cid2)
    assert not is_mounted(merged2)
    pm.run("rm", cid, cid2)
    pm.run("rmi", "localhost/unionfs-test:committed", "localhost/unionfs-test:base")


DEEP_LAYERS = 10


def _deep_image(dest: Path) -> Path:
    """The busybox image (3 layers) with 7 more, each adding a file to data/ and a directory of
    its own under deep/, and the last one removing a file of the first extra layer."""
    layers = busybox_layers()
    for i in range(3, DEEP_LAYERS):
        entries = [Entry("data", "dir"), Entry(f"data/l{i}.txt", data=f"layer {i}\n".encode()),
                   Entry("deep", "dir"), Entry(f"deep/d{i}", "dir"),
                   Entry(f"deep/d{i}/f.txt", data=f"deep {i}\n".encode())]
        if i == DEEP_LAYERS - 1:
            entries.append(Entry("data/.wh.l3.txt"))
        layers.append(layer_tar(entries))
    img = make_image(layers, repo_tags=("localhost/unionfs-deep:latest",))
    return write_docker_archive(img, dest)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("podman", ["lowercache={lcache}"], indirect=True, ids=["lowercache"])
def test_podman_deep_image_second_mount_checks_its_layers_ahead(
        podman: Podman, tmp_path: Path) -> None:
    """A 10-layer image mounted twice: the first mount learns the layers (one lower cache file
    each), the second has a helper check them ahead (`unionfs/lowercheck.py`): podman's mount
    returns while it runs, the tree is right, the server uses its results (stats dump), and
    podman umount leaves no process behind (the fixture checks, the helper included)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs (no helper with one)")
    pm = podman
    stats = tmp_path / "stats.json"
    pm.env["UNIONFS_STATS_FILE"] = str(stats)  # (podman passes it on to the mount program)
    pm.run("load", "-i", str(_deep_image(tmp_path / "deep.tar")))
    cid = pm.run("create", "--network", "none", "localhost/unionfs-deep:latest",
                 "/bin/sh").stdout.strip()

    def check(merged: Path) -> None:
        assert fs_type(merged) == "fuse.unionfs"
        for i in range(4, DEEP_LAYERS):
            assert (merged / "data" / f"l{i}.txt").read_text() == f"layer {i}\n"
        assert not (merged / "data" / "l3.txt").exists()
        assert sorted(os.listdir(merged / "deep")) == [f"d{i}" for i in range(3, DEEP_LAYERS)]
        assert (merged / "deep" / "d5" / "f.txt").read_text() == "deep 5\n"
        assert (merged / "data" / "layer3.txt").read_text() == "added by layer 3\n"

    merged = Path(pm.run("mount", cid).stdout.strip())
    lowers = pm.mount_call(merged)[1].split("lowerdir=", 1)[1].split(",", 1)[0]
    assert len(lowers.split(":")) == DEEP_LAYERS, lowers
    check(merged)
    pm.run("umount", cid)
    assert len(list((pm.root / "lcache").glob("*.layer"))) == DEEP_LAYERS
    merged = Path(pm.run("mount", cid).stdout.strip())
    servers = _servers_for(merged)
    server = next(p for p in servers if _ppid(p) not in servers)  # (not its helper)
    deadline = time.monotonic() + 20
    while not _children(server):  # (a zombie once done, until the server reads a result)
        assert time.monotonic() < deadline, "the second mount started no helper"
        time.sleep(0.01)
    check(merged)
    stats.unlink(missing_ok=True)
    os.kill(server, signal.SIGUSR1)
    while not stats.exists():
        assert time.monotonic() < deadline, "no stats dump"
        time.sleep(0.01)
    time.sleep(0.05)  # (written atomically: renamed into place)
    used = json.loads(stats.read_text())["lowercache_checked_ahead"]
    assert used > 0, used
    pm.run("umount", cid)
    assert _wait_gone(servers, 10) == [], "the server or its helper outlived podman umount"
    pm.run("rm", cid)
