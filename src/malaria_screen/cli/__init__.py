"""The ``malaria-screen`` command line (Typer). Each command group registers itself here."""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="malaria-screen: find Plasmodium-parasitized red blood cells in thin blood smear images. "
    "Research use only; not a medical device.",
)

# Command groups, in the order they appear in --help. A group whose optional dependencies are
# missing (e.g. the torch-free runtime install) is skipped.
_GROUPS = ("core", "smear", "deploy", "research")
for _name in _GROUPS:
    try:
        _mod = importlib.import_module(f"malaria_screen.cli.{_name}")
    except ModuleNotFoundError as _exc:  # optional group absent or its deps not installed
        if _exc.name and _exc.name.startswith(f"malaria_screen.cli.{_name}"):
            continue
        raise
    if hasattr(_mod, "register"):
        _mod.register(app)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # Lightning logs tips and device notes at INFO through its own handler
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        # OpenCV's decoder logs its own "[ WARN] ... input buffer is incomplete" on stderr for
        # every corrupt file, beside our per-file error; read when cv2 is first imported (lazily,
        # after this), and a value the user set is kept.
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


def main() -> None:
    """Entry point of the ``malaria-screen`` script."""
    app()
