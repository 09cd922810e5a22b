import numpy as np
import pytest

from malaria_screen.data.dataset import scan_image_folder
from malaria_screen.data.patients import patient_ids_from_names
from malaria_screen.data.split import check_leak_free, patient_folds, patient_split, split_manifest


@pytest.fixture(scope="module")
def nih_index(nih_dir):
    relpaths, labels, classes = scan_image_folder(nih_dir)
    return relpaths, labels, classes, patient_ids_from_names(relpaths)


def test_default_split_is_patient_disjoint_and_about_70_10_20(nih_index):
    relpaths, labels, classes, patients = nih_index
    s = patient_split(labels, patients, seed=0)
    m = split_manifest(s, patients=patients, relpaths=relpaths, labels=labels, class_names=classes, seed=0)
    check_leak_free(m)
    n = {k: v["n_patients"] for k, v in m["splits"].items()}
    assert sum(n.values()) == 160
    assert 0.6 <= n["train"] / 160 <= 0.8 and 0.05 <= n["val"] / 160 <= 0.15 and 0.15 <= n["test"] / 160 <= 0.25
    assert len(s.train) + len(s.val) + len(s.test) == len(labels)
    # stratified: Parasitized share of cells within 5 points in every split
    overall = (labels == 0).mean()
    for idx in (s.train, s.val, s.test):
        assert abs((labels[idx] == 0).mean() - overall) < 0.05
    # seeded: same seed, same split; other seed, other split
    s2 = patient_split(labels, patients, seed=0)
    assert np.array_equal(s.test, s2.test)
    assert not np.array_equal(s.test, patient_split(labels, patients, seed=1).test)


def test_leak_check_catches_shared_patient_and_file(nih_index):
    relpaths, labels, classes, patients = nih_index
    s = patient_split(labels, patients, seed=0)
    m = split_manifest(s, patients=patients, relpaths=relpaths, labels=labels, class_names=classes, seed=0)
    m["splits"]["test"]["patients"].append(m["splits"]["train"]["patients"][0])
    with pytest.raises(ValueError, match="patients list disagrees with its files"):
        check_leak_free(m)
    # A train patient's file moved to test, the patients lists left as they were: the patients are
    # re-derived from the file names, so the lists cannot hide it.
    m = split_manifest(s, patients=patients, relpaths=relpaths, labels=labels, class_names=classes, seed=0)
    moved = m["splits"]["train"]["files"].pop()
    m["splits"]["test"]["files"].append(moved)
    with pytest.raises(ValueError, match="disagrees"):
        check_leak_free(m)
    m["splits"]["test"]["patients"] = sorted(set(m["splits"]["test"]["patients"]) | {patient_ids_from_names([moved])[0]})
    with pytest.raises(ValueError, match="patient leakage"):
        check_leak_free(m)
    m = split_manifest(s, patients=patients, relpaths=relpaths, labels=labels, class_names=classes, seed=0)
    m["splits"]["val"]["files"].append(m["splits"]["train"]["files"][0])
    m["splits"]["val"]["patients"].append(patient_ids_from_names([m["splits"]["train"]["files"][0]])[0])
    with pytest.raises(ValueError, match="file leakage"):
        check_leak_free(m)


def test_a_random_cell_split_would_leak(nih_index):
    """The reason for all this: a random 80/20 cell split shares nearly every patient."""
    relpaths, labels, classes, patients = nih_index
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(labels))
    tr, te = perm[: int(0.8 * len(perm))], perm[int(0.8 * len(perm)) :]
    shared = {patients[i] for i in tr} & {patients[i] for i in te}
    assert len(shared) > 100


def test_folds_cover_every_cell_once(nih_index):
    _, labels, _, patients = nih_index
    seen = np.zeros(len(labels), int)
    pats = np.asarray(patients)
    for tr, te in patient_folds(labels, patients, n_splits=5, seed=0):
        assert not set(pats[tr]) & set(pats[te])
        seen[te] += 1
    assert (seen == 1).all()


def test_split_errors():
    with pytest.raises(ValueError, match="labels has"):
        patient_split(np.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="n_splits"):
        list(patient_folds(np.array([0, 1]), ["a", "a"], n_splits=2))
    with pytest.raises(ValueError, match="bad fractions"):
        patient_split(np.zeros(4), list("abcd"), val_fraction=0.5, test_fraction=0.6)


def test_leak_check_uses_the_groups_csv_rule():
    """Non-NIH names: the patient comes from the groups map (as in training), per image otherwise."""
    m = {"splits": {"train": {"patients": ["a"], "files": ["x/1.png", "x/2.png"]},
                    "test": {"patients": ["b"], "files": ["x/3.png"]}}}
    check_leak_free(m, groups={"x/1.png": "a", "x/2.png": "a", "x/3.png": "b"})
    with pytest.raises(ValueError, match="patient leakage"):
        check_leak_free(m | {"splits": {"train": m["splits"]["train"], "test": {"patients": ["a"], "files": ["x/3.png"]}}},
                        groups={"x/1.png": "a", "x/2.png": "a", "x/3.png": "a"})
    with pytest.raises(ValueError, match="no patient id"):
        check_leak_free(m)
    check_leak_free({"splits": {k: {"patients": v["files"], "files": v["files"]} for k, v in m["splits"].items()}}, per_image=True)


def test_forced_test_patients_all_land_in_test_and_about_20_percent_are_tested(nih_index, samples_dir):
    relpaths, labels, classes, patients = nih_index
    names = [p.name for p in sorted(samples_dir.glob("*/*.png"))]
    forced = sorted(set(patient_ids_from_names(names)))
    assert len(forced) >= 8  # the 24 bundled samples come from 17 patients
    s = patient_split(labels, patients, seed=0, force_test=forced)
    m = split_manifest(s, patients=patients, relpaths=relpaths, labels=labels, class_names=classes, seed=0,
                       forced_test_patients=forced)
    check_leak_free(m)
    assert set(forced) <= set(m["splits"]["test"]["patients"])
    assert m["forced_test_patients"] == forced
    n = {k: v["n_patients"] for k, v in m["splits"].items()}
    assert sum(n.values()) == 160 and len(s.train) + len(s.val) + len(s.test) == len(labels)
    assert 0.15 <= n["test"] / 160 <= 0.25 and 0.05 <= n["val"] / 160 <= 0.15
    with pytest.raises(ValueError, match="not in the data"):
        patient_split(labels, patients, force_test=["P99999"])


def test_forced_test_patients_on_a_few_patients_split_as_without(nih_index):
    """Nine real patients, two of them forced into test (they fill its share): the rest still
    splits into train and validation, as the same patients do without forcing."""
    relpaths, labels, classes, patients = nih_index
    patients, labels = np.asarray(patients), np.asarray(labels)
    nine = sorted(set(patients.tolist()))[:9]
    keep = np.flatnonzero(np.isin(patients, nine))
    lab, pat = labels[keep], patients[keep]
    plain = patient_split(lab, pat, seed=0)
    forced = patient_split(lab, pat, seed=0, force_test=nine[:2])
    for s in (plain, forced):
        assert len(s.train) and len(s.val) and len(s.test)
        assert len(s.train) + len(s.val) + len(s.test) == len(keep)
        assert not set(pat[s.train]) & set(pat[s.val]) and not set(pat[s.val]) & set(pat[s.test])
    assert set(pat[forced.test]) == set(nine[:2])
