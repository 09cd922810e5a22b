"""The ``malaria-screen`` command line (Typer). Each command group registers itself here."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import typer

__all__ = ["app", "main"]

# Pillow allocates a large image in blocks of PILLOW_BLOCK_SIZE (16 MB by default). glibc serves
# blocks that size from the decoding thread's own heap arena and keeps them after they are freed,
# so `predict --workers 4` on 81 Mpx JPEGs peaked at 2.2 GB against 1.5 GB with one thread, although
# the decodes run one at a time (PixelBudget). Blocks of 64 MB are above glibc's largest mmap
# threshold (32 MB), so each is returned to the system when freed: 1.5 GB with 4 threads. Read once,
# when Pillow is first imported (by the command groups below); a value the user set is kept.
if "PIL.Image" not in sys.modules:
    os.environ.setdefault("PILLOW_BLOCK_SIZE", "64m")

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="malaria-screen: find Plasmodium-parasitized red blood cells in thin blood smear images. "
    "Research use only; not a medical device.",
)

# Command groups, in the order they appear in --help. A group whose optional dependencies are
# missing (e.g. the torch-free runtime install) is skipped.
_GROUPS = ("core", "smear", "adapt", "domain", "deploy", "research")
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
