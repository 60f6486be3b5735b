"""Random operation sequences on the engine, checked against a fresh resolution after each step.

The engine keeps what it learned about each node (upper or not, which lower layers a directory
merges) for as long as the kernel holds the node, so after every operation each live node must
equal what a fresh lookup from the root finds on disk. Upper directories that are opaque must
not hold whiteouts (kernel overlayfs would list them). Runs on the engine directly, without a
mount, so hundreds of sequences take seconds. UNIONFS_ENGINE_SEEDS raises the number of seeds.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from pathlib import Path

import pytest

from unionfs import sys_linux as sl
from unionfs.config import Config
from unionfs.core.resolve import Kind
from unionfs.inodes import Node
from unionfs.union import Union

SEEDS = int(os.environ.get("UNIONFS_ENGINE_SEEDS", "120"))
NAMES = [b"a", b"b", b"c", b"d", b"x", b"y", b"z"]


def _build(root: Path, rng: random.Random) -> None:
    for layer in ("l0", "l1"):
        for d in ["", "a", "b", "a/c", "b/c", "a/c/d"]:
            if rng.random() < 0.7:
                (root / layer / d).mkdir(parents=True, exist_ok=True)
                for f in "xyz":
                    if rng.random() < 0.4:
                        (root / layer / d / f).write_text(layer + d + f)


def _fresh(u: Union, node: Node) -> tuple[bool, tuple[tuple[int, bytes], ...], Kind]:
    parts = node.path().split(b"/")
    n = u.root
    for comp in parts[:-1]:
        res, _, paths = u._resolve(n, comp)
        assert res.kind is Kind.DIR, f"parent of {node} vanished"
        n, _ = u._node_for(n, comp, res, paths, register=False)
    res, _, paths = u._resolve(n, parts[-1])
    assert res.kind is not Kind.MISSING, f"{node} is not on disk"
    up = res.branches[0] == 0
    if res.kind is Kind.DIR:
        lowers = tuple((b, paths[b]) for b in res.branches if b != 0)
    else:
        lowers = () if up else ((res.branches[0], paths[res.branches[0]]),)
    return up, lowers, res.kind


def _check(u: Union) -> None:
    for node in list(u.inodes.nodes.values()):
        if node.unlinked or node.parent is None:
            continue
        up, lowers, kind = _fresh(u, node)
        assert (node.upper, node.lowers, node.is_dir) == (up, lowers, kind is Kind.DIR), \
            f"stale {node}: on disk upper={up} lowers={lowers} kind={kind}"
    assert u.config.upper is not None
    for dp, _dns, fns in os.walk(u.config.upper):
        try:
            opaque = os.getxattr(dp, "trusted.overlay.opaque") == b"y"
        except OSError:
            opaque = False
        for f in fns if opaque else ():
            st = os.lstat(os.path.join(dp, f))
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), \
                f"whiteout {dp}/{f} inside an opaque directory"
    assert os.listdir(Path(u.config.work or "") / "work") == []


@pytest.mark.parametrize("seed", range(SEEDS))
def test_nodes_match_disk_after_every_operation(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    for d in ("l0", "l1", "u", "w"):
        (tmp_path / d).mkdir()
    _build(tmp_path, rng)
    u = Union(Config(lowers=(str(tmp_path / "l0"), str(tmp_path / "l1")),
                     mountpoint=str(tmp_path), upper=str(tmp_path / "u"),
                     work=str(tmp_path / "w")))
    log: list[tuple[object, ...]] = []

    def some_dir() -> Node:
        n = u.root
        for _ in range(rng.randint(0, 3)):
            try:
                c, _ = u.lookup(n.ino, rng.choice(NAMES))
            except OSError:
                break
            if not c.is_dir:
                break
            n = c
        return n

    try:
        for _step in range(60):
            op = rng.choice(["unlink", "rmdir", "mkdir", "create", "rename", "rename",
                             "exchange", "noreplace", "link", "chmod", "write"])
            p, q = some_dir(), some_dir()
            a, b = rng.choice(NAMES), rng.choice(NAMES)
            try:
                if op == "unlink":
                    u.unlink(p.ino, a)
                elif op == "rmdir":
                    u.rmdir(p.ino, a)
                elif op == "mkdir":
                    u.mkdir(p.ino, a, 0o755)
                elif op == "create":
                    fh, _, _ = u.create(p.ino, a, 0o644, os.O_WRONLY)
                    u.release(fh)
                elif op in ("rename", "exchange", "noreplace"):
                    flags = {"rename": 0, "exchange": sl.RENAME_EXCHANGE,
                             "noreplace": sl.RENAME_NOREPLACE}[op]
                    u.rename(p.ino, a, q.ino, b, flags)
                elif op == "link":
                    c, _ = u.lookup(p.ino, a)
                    u.link(c.ino, q.ino, b)
                elif op == "chmod":
                    c, _ = u.lookup(p.ino, a)
                    u.setattr(c.ino, mode=0o700)
                else:
                    c, _ = u.lookup(p.ino, a)
                    fh = u.open(c.ino, os.O_WRONLY)
                    u.write(fh, 0, b"w")
                    u.release(fh)
                log.append((op, p.path(), a, q.path(), b, "ok"))
            except OSError as e:
                log.append((op, p.path(), a, q.path(), b, errno.errorcode[e.errno or 0]))
            try:
                _check(u)
            except AssertionError as e:
                raise AssertionError(f"{e}\nlast operations: {log[-6:]}") from None
    finally:
        u.close()
