"""Atomic writes: whole file or nothing, for any valid file name."""

import os

import pytest

from malaria_screen.fileio import atomic_write, atomic_write_json, atomic_write_text


def test_long_valid_file_name_is_written(tmp_path):
    name = "c" * 246 + ".csv"  # 250 bytes: valid (limit 255), too long for a name built on it
    out = atomic_write_text(tmp_path / name, "path,label\n")
    assert out == tmp_path / name and out.read_text() == "path,label\n"
    atomic_write_json(tmp_path / ("j" * 245 + ".json"), {"p": float("nan")})
    assert (tmp_path / ("j" * 245 + ".json")).read_text() == '{\n  "p": null\n}\n'
    assert sorted(os.listdir(tmp_path)) == sorted([name, "j" * 245 + ".json"])  # no temporary left


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / ("r" * 250)
    atomic_write_text(target, "old\n")

    def writer(fh):
        fh.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, writer)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == [target.name]
