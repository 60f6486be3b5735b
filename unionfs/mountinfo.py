"""Reading /proc/self/mountinfo and writing overlay-style mount options: shared by the CLI, the
benchmarks and the tests, so there is one parser of the kernel's escapes and one escaper of
option values."""

from __future__ import annotations

import re
from collections.abc import Sequence
from os import PathLike

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space, ...)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts(path: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount in this namespace, in mount order."""
    out = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            out.append((unescape(left.split()[4]), right.split()[0]))
    return out


def device_of(mountpoint: str, path: str = "/proc/self/mountinfo") -> str | None:
    """"major:minor" of the topmost mount at MOUNTPOINT (its backing device info in sysfs is
    /sys/class/bdi/<major:minor>), or None."""
    found = None
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" - ", 1)[0].split()
            if unescape(fields[4]) == mountpoint:
                found = fields[2]
    return found


def escape_option(p: str | PathLike[str]) -> str:
    """Escape a path for a `lowerdir=`/`upperdir=`/`workdir=` value (\\, : and , escaped)."""
    return str(p).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def lowerdir_option(lowers: Sequence[str | PathLike[str]]) -> str:
    """`lowerdir=` value: branches top-first, joined by ':'."""
    return ":".join(escape_option(p) for p in lowers)
