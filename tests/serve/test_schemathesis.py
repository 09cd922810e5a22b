"""Issue 23: property-based requests from the API's own OpenAPI schema (Schemathesis) never get a
5xx. Bounded: at most 25 generated cases per operation (5 operations), derandomized (fixed
seed), in-process (ASGI), no network; measured 68 s with 30 cases at load average ~20 on 2 cores."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("skimage")
from hypothesis import HealthCheck, settings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "src" / "malaria_screen" / "assets" / "default_model" / "model.onnx"


def _app():
    from malaria_screen.inference import OnnxPredictor
    from malaria_screen.serve import ServeLimits, ServeSecurity, create_app

    # "testserver" is the Host of Schemathesis's ASGI client; small limits keep each case cheap
    sec = ServeSecurity(allowed_hosts=("testserver", "localhost"))
    return create_app(OnnxPredictor.from_file(MODEL), ServeLimits(max_pixels=4_000_000, max_request_cpu_s=5.0),
                      security=sec, field_in_process=False)


if not MODEL.is_file():
    pytest.skip("bundled ONNX model not present", allow_module_level=True)

APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
