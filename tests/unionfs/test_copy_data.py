"""`copyup.copy_data` on its own: a file without holes has its blocks reserved before any byte is
copied (fallocate), a sparse one keeps its holes, and the copy is byte for byte."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs import copyup
from unionfs import sys_linux as sl


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (tmpfs has fallocate and runs out of space on demand)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True,
                   timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def _copy(src: Path, dst: Path) -> None:
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copyup.copy_data(s, d, os.fstat(s).st_size)
    finally:
        os.close(s)
        os.close(d)


def test_a_full_disk_fails_the_copy_before_any_data_is_written(tmp_path: Path,
                                                              small_tmpfs: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 << 20))
    dst = small_tmpfs / "dst"
    with pytest.raises(OSError) as exc:
        _copy(src, dst)
    assert exc.value.errno == errno.ENOSPC
    st = dst.stat()
    # without the reservation the copy fills the 2 MiB first and fails half way
    assert st.st_blocks == 0, f"{st.st_blocks * 512} bytes were written before ENOSPC"


def test_a_file_without_holes_is_reserved_then_copied(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = sl.fallocate

    def spy(fd: int, off: int, length: int) -> None:
        calls.append((off, length))
        real(fd, off, length)

    monkeypatch.setattr(sl, "fallocate", spy)
    data = os.urandom(3 << 20)
    (tmp_path / "src").write_bytes(data)
    _copy(tmp_path / "src", tmp_path / "dst")
    assert calls == [(0, 3 << 20)]
    assert (tmp_path / "dst").read_bytes() == data


def test_a_sparse_file_is_not_reserved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(sl, "fallocate", lambda fd, off, length: calls.append((off, length)))
    with open(tmp_path / "src", "wb") as fh:
        fh.write(b"head")
        fh.truncate(32 << 20)
    _copy(tmp_path / "src", tmp_path / "dst")
    st = (tmp_path / "dst").stat()
    assert calls == []
    assert st.st_size == 32 << 20 and st.st_blocks * 512 < 1 << 20
    with open(tmp_path / "dst", "rb") as fh:
        assert fh.read(4) == b"head"


def test_fallocate_reports_the_kernels_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as exc:
            sl.fallocate(fd, 0, 4096)  # not open for writing
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_the_reservation_leaves_the_size_to_the_data(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sl.fallocate(fd, 0, 1 << 20)
        st = os.fstat(fd)
        assert st.st_size == 0  # a crash mid-copy shows how far the data got
        assert st.st_blocks * 512 >= 1 << 20
    finally:
        os.close(fd)
