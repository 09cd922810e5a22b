"""The slide table: ratio estimate per slide, an interval at the fields' effective sample size, and `smear-slides`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from malaria_screen.smear.parasitemia import binomial_ci
from malaria_screen.smear.slides import slide_row


def test_slide_row_pools_fields_and_its_interval_widens_when_fields_disagree():
    same = [{"n_rbc": 200, "n_infected": 4, "parasitemia": 0.02}] * 6
    mixed = [{"n_rbc": 200, "n_infected": k, "parasitemia": k / 200} for k in (0, 0, 0, 0, 4, 20)]
    a, b = slide_row("a", same), slide_row("b", mixed)
    assert a["parasitemia"] == pytest.approx(0.02) and b["parasitemia"] == pytest.approx(24 / 1200)
    lo, hi = binomial_ci(24, 1200)
    # identical fields: the pooled cells' binomial interval (a cluster bootstrap over fields gave it zero width)
    assert (a["ci95_low"], a["ci95_high"]) == pytest.approx((lo, hi)) and a["n_effective"] == 1200
    assert b["ci95_low"] < lo and b["ci95_high"] > hi  # clustered: wider than the pooled binomial interval
    assert b["n_effective"] < 1200 / 2 and "design effect" in b["ci_method"]
    one = slide_row("c", same[:1])  # one field: its own binomial interval, not a point
    assert (one["ci95_low"], one["ci95_high"]) == pytest.approx(binomial_ci(4, 200))


def test_slide_row_leaves_out_of_domain_fields_out_unless_asked():
    fields = [{"n_rbc": 200, "n_infected": 2, "parasitemia": 0.01, "in_domain": True},
              {"n_rbc": 100, "n_infected": 30, "parasitemia": 0.3, "in_domain": False},
              {"n_rbc": 100, "n_infected": 1, "parasitemia": 0.01, "in_domain": None}]  # unchecked: counted
    r = slide_row("s", fields)
    assert (r["n_fields"], r["n_out_of_domain"], r["n_rbc"]) == (3, 1, 300) and r["parasitemia"] == pytest.approx(3 / 300)
    r = slide_row("s", fields, include_out_of_domain=True)
    assert (r["n_rbc"], r["n_out_of_domain"]) == (400, 1) and r["parasitemia"] == pytest.approx(33 / 400)


def test_slide_row_uses_each_fields_own_estimate():
    """A field's estimate (parasitemia x RBC) is what enters, not its raw count, so other
    per-field estimators plug in; a field without one enters with its count."""
    fields = [{"n_rbc": 100, "n_infected": 9, "parasitemia": 0.01}, {"n_rbc": 300, "n_infected": 3, "parasitemia": None}]
    r = slide_row("s", fields)
    assert r["infected_estimate"] == pytest.approx(4.0) and r["parasitemia"] == pytest.approx(4 / 400)
    empty = slide_row("e", [{"n_rbc": 0, "n_infected": 0, "parasitemia": None}], n_failed=2)
    assert empty["parasitemia"] is None and (empty["ci95_low"], empty["ci95_high"]) == (0.0, 1.0) and empty["n_failed"] == 2


def test_an_unclassified_slide_has_no_parasitemia_not_zero(tmp_path):
    """`smear-slides --no-classify` counts red cells only: its row says so (no parasitemia, the
    interval (0, 1)), as the slide's own summary.json does, instead of a 0 % that reads as negative."""
    from malaria_screen.cli import app
    from smear_synth import synthetic_field
    from PIL import Image

    img, _ = synthetic_field()
    (tmp_path / "slideA").mkdir()
    for n in ("f1.png", "f2.png"):
        Image.fromarray(img).save(tmp_path / "slideA" / n)
    r = CliRunner().invoke(app, ["smear-slides", str(tmp_path / "slideA"), "--out", str(tmp_path / "out"), "--no-classify",
                                 "--no-overlays", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "parasitemia n/a" in r.output and "0.000%" not in r.output
    row = json.loads((tmp_path / "out" / "slides.json").read_text())["slides"][0]
    assert row["n_rbc"] == 12 and row["parasitemia"] is None and row["infected_estimate"] is None
    assert (row["ci95_low"], row["ci95_high"]) == (0.0, 1.0)
    assert json.loads((tmp_path / "out" / "slideA" / "summary.json").read_text())["parasitemia"] is None
    (tmp_path / "slideB").mkdir()  # a slide folder without field images: exit 1, as smear on it
    r = CliRunner().invoke(app, ["smear-slides", str(tmp_path / "slideA"), str(tmp_path / "slideB"), "--out",
                                 str(tmp_path / "out2"), "--no-classify", "--no-overlays", "--workers", "1"])
    assert r.exit_code == 1 and "no field images in slide folder(s): slideB" in r.output, r.output


def test_smear_slides_writes_one_folder_and_one_row_per_slide(data_dir, tmp_path):
    from malaria_screen.cli import app

    fields = sorted((data_dir / "iml_malaria_dev" / "images").iterdir())[:4]
    for i, name in enumerate(("slideA", "slideB")):
        (tmp_path / name).mkdir()
        for f in fields[2 * i : 2 * i + 2]:
            (tmp_path / name / f.name).symlink_to(f)
    r = CliRunner().invoke(app, ["smear-slides", str(tmp_path / "slideA"), str(tmp_path / "slideB"), "--out",
                                 str(tmp_path / "out"), "--no-overlays", "--workers", "2"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "out" / "slides.csv").open()))
    assert [x["slide"] for x in rows] == ["slideA", "slideB"]
    for x in rows:
        s = json.loads((tmp_path / "out" / x["slide"] / "summary.json").read_text())
        counted = [f for f in s["fields"] if f["in_domain"] is not False]  # the self-check ran, as in smear
        assert int(x["n_fields"]) == s["n_fields"] == 2 and int(x["n_out_of_domain"]) == 2 - len(counted)
        assert int(x["n_rbc"]) == s["n_rbc"] == sum(f["n_rbc"] for f in counted)
        if counted:
            est = sum(f["parasitemia"] * f["n_rbc"] for f in counted)
            assert float(x["parasitemia"]) == pytest.approx(est / s["n_rbc"], abs=1e-9)
        assert float(x["ci95_low"]) <= float(x["parasitemia"]) <= float(x["ci95_high"])
    assert json.loads((tmp_path / "out" / "slides.json").read_text())["slides"][0]["slide"] == "slideA"
    assert all(f["in_domain"] is not None for x in rows for f in
               json.loads((tmp_path / "out" / x["slide"] / "summary.json").read_text())["fields"])
