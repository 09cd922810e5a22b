"""True labels from class-named folders and the demo's score line."""

from malaria_screen.inference.known_labels import folder_labels, score_line


def test_folder_labels_only_for_class_folders():
    paths = ["a/Parasitized/x.png", "b/Uninfected/y.png", "c/other/z.png", "w.png"]
    assert folder_labels(paths, ["Parasitized", "Uninfected"]) == ["Parasitized", "Uninfected", None, None]


def test_score_line_says_where_the_patients_come_from():
    truth = ["Parasitized", "Uninfected", "Uninfected", None]
    calls = ["Parasitized", "Parasitized", "Uninfected", "Uninfected"]
    assert score_line(truth, calls, [False, False, False, None]) == "2 of 3 right, held-out patients"
    # cells the model trained or validated on (or cannot place) are named, never scored
    assert score_line(truth, calls, [True, False, None, None]) == (
        "0 of 1 right, held-out patients; not scored: 1 cells of the model's training/validation patients, "
        "1 cells of patients not known to the model's split")
    assert score_line(truth, calls, [True, True, False, None]) == (
        "1 of 1 right, held-out patients; not scored: 2 cells of the model's training/validation patients")
    assert score_line([None], ["Uninfected"], [False]) is None
    assert score_line(["Uninfected"], [None], [False]) is None  # failed file: no call
