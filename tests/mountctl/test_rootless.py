"""mountctl as an unprivileged user (uid 1000), for real.

Each command runs in a private mount namespace made by the harness (test_run_helpers): a 0666
node 10,229 is bound over /dev/fuse there (the host's 0600 node is untouched), and /root, which
uid 1000 cannot traverse, is replaced there by a tmpfs holding only the Python installation.
mountctl itself then creates the user namespace: a single-id mapping by default, and with
newuidmap/newgidmap when /etc/subuid and /etc/subgid (replaced in that namespace by files
granting uid 1000 the range 200000-265535) have a range.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mountctl.conftest import ArchiveFactory
from tests.mountctl.test_run_helpers import (
    ROOTLESS_UID,
    SUBID_START,
    Mctl,
    cleanup,
    copy_for,
    make_root,
    read_upper,
    unionfs_servers,
    wait_line,
)

FUSE = ("--driver", "fuse")


def _mctl(tmp_path: Path, archive: ArchiveFactory, subids: bool) -> Iterator[Mctl]:
    root = make_root(tmp_path, rootless=True)
    m = Mctl(root, rootless=True, subids=subids)
    src = copy_for(archive("oci-tar", "gzip"), root.parent / "in", rootless=True)
    try:
        out = m.ok("import", str(src))
        assert "busybox-test:latest" in out
        yield m
    finally:
        found = cleanup(root, m.mark)
        m.close()
        shutil.rmtree(root.parent, ignore_errors=True)
    assert found == ([], []), f"left behind (mounts, processes): {found}"


@pytest.fixture
def single(tmp_path: Path, archive: ArchiveFactory) -> Iterator[Mctl]:
    yield from _mctl(tmp_path, archive, subids=False)


@pytest.fixture
def ranged(tmp_path: Path, archive: ArchiveFactory) -> Iterator[Mctl]:
    yield from _mctl(tmp_path, archive, subids=True)


def test_the_harness_really_is_unprivileged(single: Mctl) -> None:
    found = list((single.root / "layers" / "sha256").glob("*/bin/busybox"))
    assert len(found) == 1
    assert os.stat(found[0]).st_uid == ROOTLESS_UID  # extracted by uid 1000
    assert os.stat("/dev/fuse").st_mode & 0o777 == 0o600  # the host's node is unchanged


def test_single_id_mapping_with_unionfs(single: Mctl) -> None:
    out = single.ok("run", "--name", "s", *FUSE, "-u", "0", "busybox-test",
                    "id -u; cat /proc/self/uid_map | tr -s ' '; mount | head -1; "
                    "ls -a /data /opq; echo hi > /data/new.txt; rm /data/layer3.txt")
    lines = out.splitlines()
    assert lines[0] == "0"
    assert lines[1].split() == ["0", str(ROOTLESS_UID), "1"]
    assert lines[2].startswith("mountctl on / type fuse.unionfs")
    assert " ".join(lines[3:]).split() == [
        "/data:", ".", "..", "hello-link.txt", "hello.txt", "layer2.txt", "layer3.txt",
        "/opq:", ".", "..", "new.txt"]
    upper = read_upper(single.root, "s")
    assert (upper / "data/new.txt").read_text() == "hi\n"
    assert os.stat(upper / "data/new.txt").st_uid == ROOTLESS_UID
    # unprivileged whiteout: the OCI form (mknod is not allowed in a user namespace)
    assert (upper / "data/.wh.layer3.txt").is_file() or \
        os.stat(upper / "data/layer3.txt").st_rdev == 0
    # the image's User 1000 does not exist with a single-id mapping: said plainly
    p = single("run", "--rm", *FUSE, "busybox-test")
    assert p.returncode == 125
    assert "user 1000:1000 does not exist in this rootless user namespace" in p.stderr
    assert "Traceback" not in p.stderr


def test_check_explains_rootless_mode(single: Mctl) -> None:
    out = single.ok("check")
    assert "uid 1000" in out and "not root" in out
    assert "/dev/fuse:" in out and "mode 0666" in out
    assert "no range for" in out
    assert "run will use: rootless mode: user namespace with a single-id mapping" in out


def test_subordinate_ranges_run_the_image_user(ranged: Mctl) -> None:
    assert ranged.ok("run", "--rm", *FUSE, "busybox-test") == \
        "hello from 1000:1000 in /data\n"
    out = ranged.ok("run", "--rm", *FUSE, "busybox-test", "cat /proc/self/uid_map")
    rows = [line.split() for line in out.splitlines()]
    assert rows == [["0", str(ROOTLESS_UID), "1"], ["1", str(SUBID_START), "65535"]]


def test_rm_export_commit_with_subordinate_owners(ranged: Mctl, tmp_path: Path) -> None:
    ranged.ok("run", "--name", "own", *FUSE, "-u", "0", "busybox-test",
              "mkdir -p /data/priv/sub && echo s > /data/priv/sub/f && "
              "chown -R 1000:1000 /data/priv && chmod 700 /data/priv /data/priv/sub && "
              "chmod 600 /data/priv/sub/f")
    upper = read_upper(ranged.root, "own")
    st = os.stat(upper / "data/priv")
    assert (st.st_uid, st.st_mode & 0o777) == (SUBID_START + 999, 0o700)
    out = ranged.root.parent / "out" / "own.tar"
    out.parent.mkdir()
    os.chown(out.parent, ROOTLESS_UID, ROOTLESS_UID)
    ranged.ok("export", "own", str(out))
    with tarfile.open(out) as tar:
        m = {t.name: t for t in tar.getmembers()}
        assert tar.extractfile("data/priv/sub/f").read() == b"s\n"  # type: ignore[union-attr]
    assert (m["data/priv"].uid, m["data/priv"].mode) == (1000, 0o700)
    assert (m["data/priv/sub/f"].uid, m["data/priv/sub/f"].gid) == (1000, 1000)
    ranged.ok("commit", "own", "mine:1")
    assert ranged.ok("run", "--rm", *FUSE, "mine:1", "cat /data/priv/sub/f; id -u") == \
        "s\n1000\n"
    ranged.ok("rm", "own")
    assert not upper.exists()


def test_auto_picks_kernel_overlayfs_in_the_user_namespace(ranged: Mctl) -> None:
    out = ranged.ok("run", "--name", "a", "-u", "0", "busybox-test",
                    "mount | head -1; ls -a /data /opq")
    first, listing = out.split("\n", 1)
    assert first.startswith("overlay on / type overlay") and "userxattr" in first
    assert listing.split() == ["/data:", ".", "..", "hello-link.txt", "hello.txt",
                               "layer2.txt", "layer3.txt", "/opq:", ".", "..", "new.txt"]
    rec = json.loads((read_upper(ranged.root, "a").parent / "container.json").read_text())
    assert rec["driver_used"] == "overlay" and rec["rootless"] is True


def test_rootless_server_death_and_signals(single: Mctl) -> None:
    p = single.popen("run", "--rm", *FUSE, "-u", "0", "busybox-test",
                     "trap 'echo got TERM; exit 4' TERM; echo ready; while :; do sleep 0.1; done")
    wait_line(p, "ready")
    # the harness's unshare/setpriv chain execs into mountctl: p.pid is mountctl
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert (p.returncode, out) == (4, "got TERM\n"), err

    p = single.popen("run", "--rm", *FUSE, "-u", "0", "busybox-test",
                     "echo ready; while :; do cat /data/hello.txt >/dev/null; sleep 0.05; done")
    wait_line(p, "ready")
    servers = unionfs_servers(single.root)
    assert len(servers) == 1
    start = time.monotonic()
    os.kill(servers[0], signal.SIGKILL)
    _, err = p.communicate(timeout=30)
    assert time.monotonic() - start < 15
    assert p.returncode == 125 and "unionfs server died" in err
