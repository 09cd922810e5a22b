"""malaria_screen.errors.error_text: the one text for a caught exception."""

from __future__ import annotations

from malaria_screen.data.io import ImageDecodeError
from malaria_screen.errors import error_text


def test_error_text_names_the_type_unless_the_message_stands_alone():
    assert error_text(ValueError("bad field")) == "ValueError: bad field"
    assert error_text(MemoryError()) == "MemoryError"  # no message: the type alone, no dangling colon
    decode = ImageDecodeError("not an image (PNG header missing)")
    assert error_text(decode) == "ImageDecodeError: not an image (PNG header missing)"  # smear fields
    assert error_text(decode, plain=ImageDecodeError) == "not an image (PNG header missing)"  # users' cells
    assert error_text(OSError("disk full"), plain=ImageDecodeError) == "OSError: disk full"
    assert error_text(ImageDecodeError(""), plain=ImageDecodeError) == "ImageDecodeError"
