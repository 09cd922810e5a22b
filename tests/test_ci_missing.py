"""Under ``CI=true`` a missing data folder fails the tests that need it instead of skipping them
(a broken CI set-up must not pass green); locally they skip with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_missing_data_skips_locally_and_fails_under_ci(tmp_path):
    one = "tests/cli/test_smear.py::test_smear_eval_no_classify"  # needs the IML fields
    env = {**os.environ, "MALARIA_SCREEN_DATA": str(tmp_path / "no-data-here")}
    outcomes = {}
    for ci in ("", "true"):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", one],
                           cwd=REPO, env={**env, "CI": ci}, capture_output=True, text=True, timeout=300)
        outcomes[ci] = (r.returncode, r.stdout)
    rc, out = outcomes[""]
    assert rc == 0 and "1 skipped" in out and "IML data not found" in out, out
    rc, out = outcomes["true"]
    assert rc == 1 and "1 error" in out and "CI=true" in out and "IML data not found" in out, out
