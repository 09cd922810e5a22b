"""One rule for what a folder listing takes for an image (data.io.is_image_entry), used by the
cell listing (list_image_files: predict, evaluate, training) and the field listing
(smear.report.collect_fields)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from malaria_screen.data.dataset import list_image_files
from malaria_screen.data.io import is_image_entry
from malaria_screen.smear.report import collect_fields

_OLD_FIELD_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")  # the allow-list it replaced


@pytest.mark.parametrize("name, taken", [
    ("a.png", True), ("B.JPG", True), ("c.webp", True), ("d.tiff", True), ("scan.ppm", True), ("cell_17", True),
    ("notes.txt", False), ("annotations.json", False), ("groups.CSV", False), ("report.html", False),
    ("boxes.xml", False), ("README.md", False), ("LICENSE", False), ("licence.txt", False), ("Thumbs.db", False),
    (".DS_Store", False), (".hidden.png", False), (".f.json.part", False), ("", False),
])
def test_the_rule(name, taken):
    assert is_image_entry(name) is taken


def test_cells_and_fields_take_the_same_entries_and_decode_by_content(tmp_path, sample_pngs):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / ".git").mkdir()
    rgb = Image.open(sample_pngs[0]).convert("RGB")
    rgb.save(src / "a.png")
    rgb.save(src / "webp_named.png", format="WEBP", lossless=True)
    rgb.save(src / "no_suffix", format="PNG")
    rgb.save(src / "sub" / "deep.png")
    rgb.save(src / ".git" / "hidden.png")
    for name in ("notes.txt", "annotations.json", "LICENSE", "report.html"):
        (src / name).write_text("not an image")
    (src / ".hidden.png").write_bytes(b"")
    os.symlink(tmp_path / "deleted.png", src / "gone.png")  # listed, so that decoding reports it
    top = ["a.png", "gone.png", "no_suffix", "webp_named.png"]
    assert [p.name for p in collect_fields([src])] == top
    assert [str(p.relative_to(src)) for p in list_image_files([src])] == top + ["sub/deep.png"]


def test_on_the_shared_data_it_takes_exactly_the_image_files(data_dir):
    """In every folder of ../shared/data the rule takes what the old allow-list of image suffixes
    took, and the cell listing of a folder is its field listing plus its subfolders'."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(data_dir):
        dirnames.sort()
        d = Path(dirpath)
        want = sorted(d / f for f in filenames if Path(f).suffix.lower() in _OLD_FIELD_SUFFIXES and not f.startswith("."))
        assert collect_fields([d]) == want, d
        assert [p for p in list_image_files([d]) if p.parent == d] == want, d
        n += len(want)
    assert n > 20_000  # the NIH crops, the IML and Chula fields, the sample PNGs


def test_unique_real_paths_resolves_as_realpath_does_with_each_folder_resolved_once(tmp_path, monkeypatch, samples_dir):
    """Each folder is resolved once and reused; two spellings still name one file exactly when
    their os.path.realpath is equal: files, links to files, links to folders, ``..``, missing files
    and broken links."""
    from malaria_screen.data.dataset import unique_real_paths

    monkeypatch.chdir(tmp_path)
    src = next(iter(sorted(samples_dir.glob("*/*.png"))))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(src.read_bytes())
    os.symlink(tmp_path / "a", tmp_path / "to_a")
    os.symlink(tmp_path / "a" / "x.png", tmp_path / "b" / "link.png")
    os.symlink("no_such_target", tmp_path / "b" / "broken.png")
    spellings = ["a/x.png", "./a/x.png", "b/../a/x.png", "to_a/x.png", "b/link.png", "to_a/../b/link.png",
                 "b/broken.png", "a/missing.png", "nowhere/x.png", "a/.", "a/..", str(tmp_path / "to_a" / "x.png")]
    first = {}
    for s in spellings:
        first.setdefault(os.path.realpath(s), s)
    kept = unique_real_paths(spellings)
    assert [str(p) for p in kept] == [str(Path(s)) for s in first.values()]
    assert [str(p) for p in kept] == ["a/x.png", "b/broken.png", "a/missing.png", "nowhere/x.png", "a", "a/.."]  # Path("a/.") is "a"
