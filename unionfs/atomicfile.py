"""Files written whole or not at all, and private directories, whatever the umask: for the
lower cache and index (`lowercache`, `layerindex`), the stats dump (`mount`) and mountctl's
records (`mountctl.jsonfile`). A module of its own, with nothing but `os` behind it, so that
mountctl does not import the union's machinery to write a record."""

from __future__ import annotations

import os


def write_atomically(dest: str, data: bytes, mode: int, durable: bool = True,
                     exact: bool = False) -> None:
    """DATA as the file DEST, whole or not at all (a temporary file beside it renamed over it),
    created at most MODE whatever the umask (a FUSE server runs with none), or exactly MODE
    with EXACT; DURABLE: synced before the rename."""
    tmp = f"{dest}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        with os.fdopen(fd, "wb") as f:
            if exact:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def make_private_dir(path: str, mode: int = 0o700) -> None:
    """Directory PATH, made MODE if missing, its missing parents 0755, whatever the umask (a
    FUSE server runs with none, and os.makedirs makes parents with the umask's mode alone)."""
    if os.path.isdir(path):
        return
    make_private_dir(os.path.dirname(os.path.abspath(path)), 0o755)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
