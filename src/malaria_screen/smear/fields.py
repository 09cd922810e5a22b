"""Reading field images in a batch: decode each, record the ones that fail, go on.

One bad field (undecodable, grayscale, too large for memory) never costs the others: its
error text (:func:`malaria_screen.errors.error_text`) is recorded under its name and the loop
moves to the next field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from malaria_screen.data.io import check_colour, decode_image
from malaria_screen.errors import error_text

logger = logging.getLogger(__name__)

__all__ = ["decode_field", "decoded_fields", "record_error"]


def decode_field(path: str | Path) -> np.ndarray:
    """Decode one colour field image by content.

    Parameters
    ----------
    path : str or Path
        Image file (any format :func:`~malaria_screen.data.io.decode_image` reads).

    Returns
    -------
    (H, W, 3) uint8 ndarray
        RGB pixels.

    Raises
    ------
    malaria_screen.data.io.ImageDecodeError
        If the file cannot be decoded (a ``ValueError``), or the image is grayscale.
    MemoryError
        On a field too large for memory.
    """
    return check_colour(decode_image(path))


def record_error(errors: dict[str, str], name: str, exc: BaseException) -> None:
    """``errors[name] = error_text(exc)``, logged at INFO (the commands print ``errors``).

    Parameters
    ----------
    errors : dict
        Field name -> error text, updated in place.
    name : str
        The field that failed.
    exc : BaseException
        What it raised.
    """
    errors[name] = error_text(exc)
    logger.info("skipping %s: %s", name, errors[name])


def decoded_fields(field_dir: Path, names: list[str], errors: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    """Decode the named fields of a folder one by one, skipping those that fail.

    Parameters
    ----------
    field_dir : Path
        Folder of field images.
    names : list of str
        File names in ``field_dir``, in the order wanted.
    errors : dict
        Filled with field name -> error text (:func:`record_error`) for every field that cannot
        be decoded or is grayscale (any ``Exception``, ``MemoryError`` included).

    Yields
    ------
    (str, (H, W, 3) uint8 ndarray)
        Name and RGB pixels of each field that decoded.
    """
    for name in names:
        try:
            rgb = decode_field(field_dir / name)
        except Exception as exc:  # noqa: BLE001 - ImageDecodeError, and MemoryError on a huge field
            record_error(errors, name, exc)
            continue
        yield name, rgb
