"""Chula-RBC-12 red cells cut around their annotated points as extra Uninfected training cells."""

import numpy as np
import pytest

from malaria_screen.data.extra_negatives import field_rbc_diameter, list_point_fields, point_cell_set, read_point_labels


@pytest.fixture(scope="module")
def chula_dir(data_dir):
    d = data_dir / "chula_rbc"
    if not d.is_dir():
        pytest.skip("chula_rbc not in the data folder")
    return d


def test_one_crop_per_point_one_group_per_field(chula_dir):
    cs = point_cell_set(chula_dir, size_px=48, class_names=["Parasitized", "Uninfected"], fields=["1", "2"])
    n_points = sum(len(read_point_labels(chula_dir / "labels" / f"{s}.txt")) for s in ("1", "2"))
    assert len(cs) == n_points and cs.images.shape == (n_points, 48, 48, 3) and cs.images.dtype == np.uint8
    assert set(cs.labels.tolist()) == {1} and sorted(set(cs.patients)) == ["chula_rbc:1", "chula_rbc:2"]
    assert len(set(cs.relpaths)) == n_points
    # NIH-like crops: a cell in the middle, black corners
    assert (cs.images[:, 24, 24].astype(int).sum(-1) > 150).mean() > 0.95
    assert (cs.images[:, 0, 0] == 0).all(-1).mean() > 0.9


def test_diameter_from_nearest_neighbours_is_a_red_cell_size(chula_dir):
    # 640 x 480 fields at 1000x: red cells 7-8 um are ~35-50 px across
    d = [field_rbc_diameter(read_point_labels(chula_dir / "labels" / f"{s}.txt")) for s in list_point_fields(chula_dir)]
    d = np.asarray([x for x in d if x is not None])
    assert len(d) >= 45 and 30 < np.median(d) < 50
    assert field_rbc_diameter(np.zeros((3, 2))) is None


def test_fields_with_too_few_points_are_reported_and_unknown_fields_raise(chula_dir):
    cs = point_cell_set(chula_dir, size_px=32, class_names=["Parasitized", "Uninfected"], fields=["56"])
    assert len(cs) == 0 and "chula_rbc/images/56.jpg" in cs.errors
    with pytest.raises(ValueError, match="not in"):
        point_cell_set(chula_dir, size_px=32, class_names=["Parasitized", "Uninfected"], fields=["nope"])
    with pytest.raises(ValueError, match="label"):
        point_cell_set(chula_dir, size_px=32, class_names=["A", "B"])


def test_point_cells_are_grouped_by_field_by_the_leak_check():
    from malaria_screen.data.patients import patient_ids_from_names
    from malaria_screen.data.split import check_leak_free

    files = ["chula_rbc/images/1.jpg#0", "chula_rbc/images/1.jpg#7", "chula_rbc/images/12.jpg#3"]
    assert patient_ids_from_names(files) == ["chula_rbc:1", "chula_rbc:1", "chula_rbc:12"]
    train = {"patients": ["chula_rbc:1", "chula_rbc:12"], "files": files}
    check_leak_free({"splits": {"train": train, "test": {"patients": ["P4"], "files": ["Parasitized/C39P4thinF_x_cell_1.png"]}}})
    with pytest.raises(ValueError, match="patient leakage"):
        check_leak_free({"splits": {"train": train, "test": {"patients": ["chula_rbc:1"], "files": ["chula_rbc/images/1.jpg#9"]}}})
