"""Gallery of the cells to confirm by eye (malaria_screen.smear.gallery)."""

from __future__ import annotations

import numpy as np

from malaria_screen.smear.gallery import THUMB_PX, cell_thumbnail, gallery_cells, gallery_html, select_gallery
from malaria_screen.smear.screen import CellResult, FieldResult


def _result(name: str, probs: list[float], thr: float = 0.5) -> FieldResult:
    cells = [CellResult(i + 1, [10 * i, 5, 20, 20], 300, p, "Parasitized" if p >= thr else "Uninfected", False)
             for i, p in enumerate(probs)]
    k = sum(c.label == "Parasitized" for c in cells)
    return FieldResult(name, 200, 60, len(cells), k, k / len(cells), [0.0, 1.0], cells, 20.0)


def test_thumbnail_is_the_cell_with_a_margin_padded_white_at_the_border():
    rgb = np.zeros((50, 60, 3), np.uint8)
    rgb[10:30, 20:40] = (200, 100, 150)
    t = cell_thumbnail(rgb, (20, 10, 20, 20), size=30)
    assert t.shape == (30, 30, 3) and t.dtype == np.uint8
    assert tuple(t[15, 15]) == (200, 100, 150)  # the cell in the middle
    assert tuple(t[0, 0]) == (0, 0, 0)  # field background around it
    edge = cell_thumbnail(rgb, (0, 0, 10, 10), size=30)
    assert tuple(edge[0, 0]) == (255, 255, 255)  # outside the field: white


def test_gallery_keeps_every_positive_and_the_cells_nearest_the_threshold():
    rgb = np.full((60, 200, 3), 220, np.uint8)
    a = gallery_cells(rgb, _result("a.jpg", [0.99, 0.1, 0.48, 0.7, 0.02]), threshold=0.5, n_uncertain=2)
    b = gallery_cells(rgb, _result("b.jpg", [0.55, 0.3, 0.01]), threshold=0.5, n_uncertain=2)
    assert [c.kind for c in a] == ["parasitized", "parasitized", "uncertain", "uncertain"]
    assert [c.p_parasitized for c in a if c.kind == "uncertain"] == [0.48, 0.1]
    assert all(c.thumb.shape == (THUMB_PX, THUMB_PX, 3) for c in a + b)
    pos, unc, n = select_gallery(a + b, threshold=0.5, max_parasitized=2, n_uncertain=3)
    assert n == 3 and [c.p_parasitized for c in pos] == [0.99, 0.7]
    assert [(c.field, c.p_parasitized) for c in unc] == [("a.jpg", 0.48), ("b.jpg", 0.3), ("a.jpg", 0.1)]
    assert pos[0].caption() == "a.jpg #1: p=0.99"
    page = gallery_html(pos, unc, n)
    assert page.count("<figure") == 5 and "the 2 most probable of 3" in page
    assert "a.jpg #1" in page and "data:image/jpeg;base64," in page
    assert "None." in gallery_html([], [], 0)


def test_unclassified_fields_give_no_gallery():
    res = _result("c.jpg", [0.9])
    res.cells[0].p_parasitized = None
    assert gallery_cells(np.zeros((60, 200, 3), np.uint8), res, threshold=0.5) == []


def test_the_web_apps_slide_gallery_asks_about_the_cells_nearest_the_real_decision(iml_dir):
    """``screen_slide`` (the web app's whole-field tab) labels cells with the prior correction,
    whose threshold on the raw probability is far above 0.5: the "least certain" cells are the
    uncalled ones nearest that threshold, as in ``smear``'s report, not those nearest 0.5."""
    from malaria_screen import load_model
    from malaria_screen.data.io import decode_image
    from malaria_screen.smear.parasitemia import decision_threshold, field_quantifier
    from malaria_screen.smear.slide import screen_slide

    model = load_model()
    thr = decision_threshold(field_quantifier(model), model)
    assert thr > 0.9
    names = sorted(p.name for p in (iml_dir / "images").iterdir())[:2]
    slide = screen_slide([(n, decode_image(iml_dir / "images" / n)) for n in names], model, include_out_of_domain=True)
    _, uncertain, _ = slide.gallery
    uncalled = sorted((c.p_parasitized for r in slide.fields for c in r.cells if c.label == "Uninfected"),
                      key=lambda p: abs(p - thr))
    assert [c.p_parasitized for c in uncertain] == uncalled[:len(uncertain)] and len(uncertain) == 12
