import pytest

from malaria_screen.data.patients import GroupingWarning, parse_nih_patient_id, patient_ids_from_names, read_groups_csv


@pytest.mark.parametrize(
    "name, expected",
    [
        ("C33P1thinF_IMG_20150619_114756a_cell_179.png", "P1"),
        ("C37BP2_thinF_IMG_20150620_133111a_cell_87.png", "P2"),
        ("C51AP12thinF_IMG_20150724_152017_cell_100.png", "P12"),
        ("C100P61ThinF_IMG_20150918_144104_cell_162.webp", "P61"),
        ("C38P3thinF_original_IMG_20150621_112023_cell_106.webp", "P3"),
        ("C47P8thinOriginalOlympusCX21_IMG_1.webp", "P8"),
        ("C47P8thin_Original_Motic_IMG_1.webp", "P8"),
        ("C62P23N_ThinF_IMG_20151001_1_cell_1.webp", "P23"),
        ("C167P128ReThinF_IMG_20151201_cell_3.webp", "P128"),
        ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1_thinF"),
        ("C12NThinF_IMG_20150614_124212_cell_164.png", "C12NThinF"),
        ("C201ThinF_IMG_20151029_cell_1.webp", "C201ThinF"),
        ("C3thin_original_IMG_20150608_162922_cell_1.webp", "C3thin"),
        ("Parasitized/sub/C33P1thinF_IMG_x_cell_1.png", "P1"),
    ],
)
def test_parse_every_nih_pattern(name, expected):
    assert parse_nih_patient_id(name) == expected


@pytest.mark.parametrize("name", ["cat.png", "P12.png", "IMG_001.jpg", "C_thin.png"])
def test_unparseable_names_raise(name):
    with pytest.raises(ValueError, match="patient id"):
        parse_nih_patient_id(name)


def test_every_shared_file_parses_to_160_patients(nih_dir):
    names = [f.name for d in ("Parasitized", "Uninfected") for f in (nih_dir / d).iterdir()]
    pats = {parse_nih_patient_id(n) for n in names}
    assert len(names) == 20576
    assert len(pats) == 160  # data README: 160 patients
    assert sum(p.startswith("P") for p in pats) == 120


def test_groups_csv_and_per_image(tmp_path):
    csv = tmp_path / "g.csv"
    csv.write_text("path,patient\nA/x.png,alice\ny.png,bob\n")
    groups = read_groups_csv(csv)
    assert patient_ids_from_names(["A/x.png", "B/y.png"], groups=groups) == ["alice", "bob"]
    with pytest.raises(ValueError, match="no patient id"):
        patient_ids_from_names(["A/x.png", "B/z.png"], groups=groups)
    with pytest.warns(GroupingWarning, match="per IMAGE"):
        assert patient_ids_from_names(["a.png", "b.png"], per_image=True) == ["a.png", "b.png"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,group\na,b\n")
    with pytest.raises(ValueError, match="path,patient"):
        read_groups_csv(bad)
