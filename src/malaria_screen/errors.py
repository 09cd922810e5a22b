"""One text for an exception, wherever a batch records a failed item and goes on.

Every per-item error that the commands, the web app and the REST API report (a field that could
not be decoded or screened, an upload that is not an image, ...) is written by
:func:`error_text`, so the same failure reads the same everywhere.
"""

from __future__ import annotations

__all__ = ["error_text"]


def error_text(exc: BaseException, *, plain: type[BaseException] | tuple[type[BaseException], ...] = ()) -> str:
    """``"<exception type>: <message>"``, or just the type when the message is empty.

    Parameters
    ----------
    exc : BaseException
        The exception caught for one item (``MemoryError()`` has no message).
    plain : exception type or tuple of them, optional
        Types whose message is shown alone, because it already says what went wrong in the
        user's terms (``ImageDecodeError`` for an uploaded cell: "not an image", "grayscale", ...).

    Returns
    -------
    str
        E.g. ``"ValueError: rgb image too small: ..."`` or ``"MemoryError"``.

    Examples
    --------
    >>> error_text(ValueError("bad field"))
    'ValueError: bad field'
    >>> error_text(MemoryError())
    'MemoryError'
    >>> error_text(KeyError("x"), plain=KeyError)
    "'x'"
    """
    msg = str(exc)
    if msg and plain and isinstance(exc, plain):
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
