"""Our inode numbers, the nodes the kernel knows, and their lookup counts.

A `Node` is one object of the merged tree that the kernel holds a reference to. Its location is
its parent node and name (so renaming a directory moves its whole subtree for free); which
branches hold it is `upper` (the upper branch has it at the node's path) and `lowers` (for a
directory: the lower layers it merges, as (branch, path in that branch); for a non-directory not
yet copied up: the single lower object).

Inode numbers are ours, never a branch's st_ino passed through blindly: the (st_dev, st_ino) of the
object that first represented a node is mapped to one number (identity for the first device,
device index in the high bits for others), so numbers are unique across branches, hard links in
a lower branch share a number, and a copied-up object keeps the number of its origin for the
life of the mount.
"""

from __future__ import annotations

import itertools
import os

ROOT_INO = 1
_SHIFT = 48
_LOW = (1 << _SHIFT) - 1


class Node:
    __slots__ = ("aliases", "children", "gen", "gone", "handles", "implicit", "ino", "is_dir",
                 "lowers", "merged", "name", "nlookup", "parent", "unlinked", "upper")

    def __init__(self, ino: int, parent: Node | None, name: bytes, is_dir: bool, upper: bool,
                 lowers: tuple[tuple[int, bytes], ...]) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.is_dir = is_dir
        self.upper = upper
        self.lowers = lowers
        self.nlookup = 0
        self.unlinked = False
        self.gen = 0  # bumped when the object moves to the upper branch (copy-up)
        self.handles: set[int] | None = None
        self.implicit = 0  # the handle per-inode I/O uses (`Union.inode_handle`), 0 for none
        # directories: the cached merged listing, or the number of merged subdirectories when
        # only that was needed (`Union._subdirs`)
        self.merged: object | None = None
        # cached resolutions of names in this directory, dropped with `merged` on any change
        self.children: dict[bytes, object] | None = None
        self.aliases: list[tuple[Node, bytes]] | None = None  # other names (hard links)
        # unlinked, its object gone from the upper branch: where its attributes are still
        # read (`Union._keep_gone`): an O_PATH fd of a removed directory, or the lstat a
        # removed non-directory had
        self.gone: int | os.stat_result | None = None

    def add_name(self, parent: Node, name: bytes) -> None:
        """Record another name of this (non-directory) node."""
        if self.parent is parent and self.name == name:
            return
        if self.aliases is None:
            self.aliases = []
        if not any(p is parent and n == name for p, n in self.aliases):
            self.aliases.append((parent, name))

    def drop_name(self, parent: Node, name: bytes) -> bool:
        """Forget one name; returns whether a known name is left."""
        if self.parent is parent and self.name == name:
            if not self.aliases:
                return False
            self.parent, self.name = self.aliases.pop()
            return True
        if self.aliases:
            self.aliases = [(p, n) for p, n in self.aliases if not (p is parent and n == name)]
        return True

    def move_name(self, old_parent: Node, old_name: bytes, parent: Node, name: bytes) -> None:
        if self.parent is old_parent and self.name == old_name:
            self.parent, self.name = parent, name
        elif self.aliases:
            self.aliases = [(parent, name) if (p is old_parent and n == old_name) else (p, n)
                            for p, n in self.aliases]

    def path(self) -> bytes:
        """Path of the node from the union root (b"" for the root)."""
        parts: list[bytes] = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        parts.reverse()
        return b"/".join(parts)

    def __repr__(self) -> str:
        return (f"Node(ino={self.ino}, path={self.path()!r}, dir={self.is_dir}, "
                f"upper={self.upper}, lowers={self.lowers})")


class InodeTable:
    """ino -> Node for every node the kernel holds, plus the origin map for stable numbers."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self._devs: dict[int, int] = {}
        self._aliases: dict[tuple[int, int], int] = {}
        self._spill: dict[tuple[int, int], int] = {}
        self._counter = itertools.count(1 << 62)

    def number(self, dev: int, ino: int) -> int:
        """Our inode number for the object (dev, ino)."""
        key = (dev, ino)
        n = self._aliases.get(key)
        if n is not None:
            return n
        idx = self._devs.get(dev)
        if idx is None:
            idx = self._devs[dev] = len(self._devs)
        if ino <= _LOW and idx < (1 << 14):
            n = (idx << _SHIFT) | ino
            if n > ROOT_INO:
                return n
        n = self._spill.get(key)
        if n is None:
            n = self._spill[key] = next(self._counter)
        return n

    def alias(self, dev: int, ino: int, number: int) -> None:
        """Object (dev, ino) now represents inode NUMBER (after a copy-up)."""
        self._aliases[(dev, ino)] = number

    def get(self, ino: int) -> Node:
        return self.nodes[ino]

    def add(self, node: Node) -> None:
        self.nodes[node.ino] = node

    def compact(self) -> None:
        """Give back the table memory of inodes forgotten since the peak (a dict never
        shrinks its table when entries are deleted)."""
        self.nodes = dict(self.nodes)

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.nlookup -= count
        if node.nlookup <= 0 and ino != ROOT_INO and not node.handles:
            del self.nodes[ino]
