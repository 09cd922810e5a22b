"""One ``/v1/field`` job: field image bytes in, the field's JSON out, or a refusal with its reason.

Run inside a field worker process (:mod:`malaria_screen.serve.jobs`), which bounds its CPU time
and memory; the checks that refuse a field before it is screened (size, colour, and later
whether it looks like a blood smear) go into :func:`screen_field_bytes`, in order of cost.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
from PIL import Image

from malaria_screen.data.io import ImageDecodeError, check_colour, decode_image
from malaria_screen.smear.domain import NotASmearError
from malaria_screen.smear.report import overlay_image
from malaria_screen.smear.screen import screen_field

__all__ = ["FieldRefused", "json_bytes", "screen_field_bytes"]


class FieldRefused(Exception):
    """A field that is not screened; ``status`` (HTTP) and ``detail`` say why.

    Parameters
    ----------
    status : int
        413 (too large), 422 (unreadable, not screenable, over a budget).
    detail : str
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _scalar(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_bytes(obj: Any) -> bytes:
    """``obj`` encoded as Starlette's ``JSONResponse`` does (UTF-8, compact, no NaN; NumPy
    scalars as Python numbers), for a worker to encode a field's JSON (hundreds of KB for a
    field of thousands of cells) instead of the server's event loop.

    Raises
    ------
    ValueError
        For NaN or infinity; TypeError for a value JSON cannot hold.
    """
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_scalar).encode("utf-8")


def screen_field_bytes(data: bytes, predictor, *, name: str = "field", max_pixels: int, overlay: bool = False,
                       rescorer=None, domain_reference=None) -> dict:
    """Decode, check and screen one whole thin-smear field.

    Parameters
    ----------
    data : bytes
        The encoded field image (PNG, JPEG, ...).
    predictor : CellClassifierBase
    name : str, default="field"
        Reported as the field's ``image``.
    max_pixels : int
        Largest accepted width x height, checked from the header before decoding.
    overlay : bool, default=False
        Add ``overlay_png_base64``, the outlined field as a base64 PNG.
    rescorer : CellRescorer, optional
    domain_reference : DomainReference, optional
        The model's self-check reference (:func:`malaria_screen.smear.domain.load_reference`):
        the field JSON gets ``in_domain``, ``domain_score`` and, outside the domain, a
        ``domain_note`` saying what to do.

    Returns
    -------
    dict
        :meth:`malaria_screen.smear.screen.FieldResult.to_json` (plus the overlay).

    Raises
    ------
    FieldRefused
        413 for an image over ``max_pixels``; 422 for an unreadable, grayscale or unscreenable one,
        or one that is not a blood smear field (noise, blank, a photo, text: the reason, checked on a
        downsampled copy before segmentation).
    """
    try:
        rgb = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise FieldRefused(413 if "too large" in str(exc) else 422, f"cannot read the field image: {exc}") from exc
    try:
        check_colour(rgb)
    except ImageDecodeError as exc:
        raise FieldRefused(422, f"cannot read the field image: {exc}") from exc
    try:
        res = screen_field(rgb, predictor, image_name=name, rescorer=rescorer, domain_reference=domain_reference)
    except NotASmearError as exc:  # noise, blank, a photo, text: the reason, never a parasitemia
        raise FieldRefused(422, str(exc)) from exc
    except ValueError as exc:  # a decoded image that cannot be screened, e.g. smaller than 8x8 px
        raise FieldRefused(422, f"cannot screen the field image ({rgb.shape[1]}x{rgb.shape[0]} px): {exc}") from exc
    out = res.to_json()
    if overlay:
        buf = io.BytesIO()
        Image.fromarray(overlay_image(rgb, res)).save(buf, format="PNG")
        out["overlay_png_base64"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return out
