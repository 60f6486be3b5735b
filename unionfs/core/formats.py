"""On-disk encodings of whiteouts and opaque directories, and name rules.

This module owns the vocabulary shared with kernel overlayfs, fuse-overlayfs and OCI layers
(DESIGN.md section 2). It is pure: callers hand in what they read from disk (mode, rdev, xattr
names and values, sibling names) and get a classification back.

Read, in every branch:
- whiteout: a character device 0/0; an empty regular file carrying ``trusted.overlay.whiteout`` or
  ``user.overlay.whiteout`` inside a directory marked ``overlay.opaque=x``; an OCI/AUFS file
  ``.wh.NAME`` (hides NAME in the branches *below* the one holding it).
- opaque directory: ``trusted.overlay.opaque=y``, ``user.overlay.opaque=y``,
  ``user.fuseoverlayfs.opaque=y``, or an entry ``.wh..wh..opq`` inside it.

None of these markers is ever shown through the mount.
"""

from __future__ import annotations

import errno
import stat

WH_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
NAME_MAX = 255

TRUSTED_OPAQUE = b"trusted.overlay.opaque"
USER_OPAQUE = b"user.overlay.opaque"
FUSEOVL_OPAQUE = b"user.fuseoverlayfs.opaque"
OPAQUE_XATTRS = (TRUSTED_OPAQUE, USER_OPAQUE, FUSEOVL_OPAQUE)
WHITEOUT_XATTRS = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
REDIRECT_XATTRS = (b"trusted.overlay.redirect", b"user.overlay.redirect")
# set by kernel overlayfs on what it copied up: such a directory "may hold whiteouts" even when
# nothing lies below it any more (overlayfs' OVL_WHITEOUTS), see resolve.whiteouts_refuse_removal
ORIGIN_XATTRS = (b"trusted.overlay.origin", b"user.overlay.origin")
# unionfs' own marker for a directory that is logically deleted while it waits, under the name
# given as its value (a path from the branch root), to be disposed of: it reads as a whiteout
# there. It only ever exists between two steps of a rename, so a crash cannot uncover anything.
DEAD_XATTRS = (b"trusted.unionfs.dead", b"user.unionfs.dead")

# xattr namespaces that belong to the union implementation, never to the user's files.
_PRIVATE_PREFIXES = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"user.fuseoverlayfs.",
    b"user.unionfs.",
    b"trusted.unionfs.",
)


def is_private_xattr(name: bytes) -> bool:
    """True for xattrs that encode union metadata; hidden from listxattr and protected."""
    return name.startswith(_PRIVATE_PREFIXES)


def is_chardev_whiteout(mode: int, rdev: int) -> bool:
    """The overlayfs whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(mode) and rdev == 0


def opaque_value(value: bytes | None) -> str:
    """Meaning of an ``overlay.opaque`` xattr value: 'y' opaque, 'x' has xattr-whiteouts, ''."""
    if value is None:
        return ""
    v = value.rstrip(b"\0")
    if v == b"y":
        return "y"
    if v == b"x":
        return "x"
    return ""


def is_marker_name(name: bytes) -> bool:
    """Names that only ever encode union metadata in a branch (``.wh.*``)."""
    return name.startswith(WH_PREFIX)


def whiteout_target(name: bytes) -> bytes | None:
    """For an OCI whiteout file ``.wh.NAME`` return NAME, else None (``.wh..wh..opq`` -> None)."""
    if name.startswith(WH_PREFIX) and name != OPAQUE_MARKER:
        target = name[len(WH_PREFIX):]
        if target and target not in (b".", b".."):
            return target
    return None


def wh_name(name: bytes) -> bytes:
    """The OCI whiteout file name for NAME."""
    return WH_PREFIX + name


def check_name(name: bytes, namemax: int = NAME_MAX) -> int:
    """0 if NAME may be created through the mount, else the errno to answer.

    Names of ``.wh.`` form are refused (EINVAL): in a branch they mean a whiteout, so a file of
    that name could never be read back. Over-long names get ENAMETOOLONG.
    """
    if len(name) > namemax:
        return errno.ENAMETOOLONG
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        return errno.EINVAL
    if name.startswith(WH_PREFIX):
        return errno.EINVAL
    return 0
