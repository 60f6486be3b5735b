"""The store's JSON records are written whole, with the mode asked for, and leave nothing
behind (`mountctl.jsonfile`)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from mountctl.jsonfile import write_json


@pytest.mark.parametrize(("mode", "durable"), [(0o600, False), (0o644, True)])
def test_record_written_whole_with_its_mode(tmp_path: Path, mode: int, durable: bool) -> None:
    path = tmp_path / "rec.json"
    path.write_text("old")
    old_umask = os.umask(0o077)  # the mode is what was asked for, whatever the umask
    try:
        write_json(path, {"b": [1, 2], "a": "x"}, mode=mode, durable=durable)
    finally:
        os.umask(old_umask)
    text = path.read_text()
    assert json.loads(text) == {"a": "x", "b": [1, 2]}
    assert text.startswith('{\n "a": "x"') and text.endswith("}\n")  # indented, sorted keys
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]


def test_a_stale_temporary_file_does_not_block_the_write(tmp_path: Path) -> None:
    """The temporary file of a killed process that had this pid is written over."""
    stale = tmp_path / f"rec.json.{os.getpid()}.tmp"
    stale.write_text("left by a killed process")
    write_json(tmp_path / "rec.json", [1])
    assert json.loads((tmp_path / "rec.json").read_text()) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]


def test_a_failed_write_leaves_the_old_record(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    path.write_text('"old"\n')
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})
    assert path.read_text() == '"old"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]


def test_a_write_failing_after_the_temporary_file_leaves_nothing(tmp_path: Path) -> None:
    """The rename fails (the record's name is a non-empty directory): the temporary file
    already written is removed, and what was there stays."""
    path = tmp_path / "rec.json"
    path.mkdir()
    (path / "keep").write_text("x")
    with pytest.raises(OSError):
        write_json(path, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]
    assert (path / "keep").read_text() == "x"
