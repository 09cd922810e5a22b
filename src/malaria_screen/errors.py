"""One text for an exception, wherever a batch records a failed item and goes on.

Every per-item error that the commands, the web app and the REST API report (a field that could
not be decoded or screened, an upload that is not an image, ...) is written by
:func:`error_text`, so the same failure reads the same everywhere.
"""

from __future__ import annotations

__all__ = ["error_text"]


def error_text(exc: BaseException) -> str:
    """``"<exception type>: <message>"``, or just the type when the message is empty.

    Parameters
    ----------
    exc : BaseException
        The exception caught for one item (``MemoryError()`` has no message).

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
    """
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
