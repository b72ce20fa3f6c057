"""vaultrpc.files.write_atomic: the one way files are replaced."""
import os
import stat

import pytest

from vaultrpc.files import write_atomic


def test_replaces_whole_with_the_mode_asked(tmp_path):
    target = tmp_path / "kek.json"
    target.write_text("old")
    write_atomic(target, b"new bytes", mode=0o600)
    assert target.read_bytes() == b"new bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(target, "text")
    assert target.read_text() == "text"
    assert os.listdir(tmp_path) == ["kek.json"]  # no temporary file left


def test_a_failed_rename_leaves_what_was_there_and_no_temporary(tmp_path):
    target = tmp_path / "ready.json"
    target.mkdir()
    (target / "inside").write_text("old")
    with pytest.raises(OSError):
        write_atomic(target, b"new")  # the rename onto a non-empty folder fails
    assert (target / "inside").read_text() == "old"
    assert os.listdir(tmp_path) == ["ready.json"]
