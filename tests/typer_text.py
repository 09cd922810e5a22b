"""Reading Typer's output in tests."""

from __future__ import annotations


def flat(text: str) -> str:
    """The words of ``text`` on one line, without the ``│`` borders of Typer's (rich's) boxes, which
    wrap long help and error lines anywhere (a longer tmp path splits a phrase over two lines)."""
    return " ".join(text.replace("│", " ").split())
