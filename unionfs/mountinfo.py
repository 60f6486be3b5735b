"""Reading /proc/self/mountinfo and writing overlay-style mount options: shared by the CLI, the
benchmarks and the tests, so there is one parser of the kernel's escapes and one escaper of
option values."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

_OCTAL_DIGITS = frozenset("01234567")


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space, ...): a backslash and three octal
    digits; any other backslash is kept as it is."""
    if "\\" not in field:
        return field
    head, *rest = field.split("\\")
    out = [head]
    for piece in rest:  # (what followed each backslash)
        if len(piece) >= 3 and _OCTAL_DIGITS.issuperset(piece[:3]):
            out.append(chr(int(piece[:3], 8)) + piece[3:])
        else:
            out.append("\\" + piece)
    return "".join(out)


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
