"""True labels of input files from their class-named folders, and which split of a model they come from.

When cell images sit in folders named after the model's classes (``Parasitized/``,
``Uninfected/``, as in the NIH release and the bundled samples), ``predict`` can show the true
label beside the call and count the right answers. Whether that count says anything about unseen
patients depends on the model's split: :func:`seen_flags` tells, per file, whether its patient
(parsed from the NIH file name) was a training or validation patient of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from malaria_screen.data.patients import parse_nih_patient_id

__all__ = ["folder_labels", "seen_flags", "score_line"]


def folder_labels(paths: Sequence[str | Path], class_names: Sequence[str]) -> list[str | None]:
    """The class named by each file's parent folder, or None when the folder is not a class name."""
    names = set(class_names)
    return [Path(p).parent.name if Path(p).parent.name in names else None for p in paths]


def seen_flags(model, paths: Sequence[str | Path]) -> list[bool | None]:
    """Per file: was its patient (parsed from the NIH file name) a training or validation patient of ``model``?

    ``model`` is a loaded classifier; its patients come from
    :func:`~malaria_screen.inference.base.seen_patients` (run folder's ``split.json`` or ONNX
    metadata). None for a file whose name gives no NIH patient id, or when the model lists no
    patients at all (nothing can be said).
    """
    from malaria_screen.inference.base import seen_patients  # decoding (Pillow, OpenCV): not at the CLI's start-up

    seen = seen_patients(model)
    known = seen["train"] | seen["val"]
    out: list[bool | None] = []
    for p in paths:
        try:
            pt = parse_nih_patient_id(Path(p).name)
        except ValueError:
            out.append(None)
            continue
        out.append(pt in known if known else None)
    return out


def score_line(truth: Sequence[str | None], labels: Sequence[str | None], seen: Sequence[bool | None]) -> str | None:
    """``"k of h right, held-out patients"``: the demo scores itself only on cells the model never saw.

    Only files with a true label, a call and a patient that was neither a training nor a
    validation patient of the model (``seen`` False, from :func:`seen_flags`) are scored. Files
    of the model's training/validation patients, or of patients its split cannot tell, are
    counted and named after a semicolon, never scored. None when no file has both a true label
    and a call.

    Example: ``"23 of 24 right, held-out patients"``; with a model trained on some of them:
    ``"5 of 5 right, held-out patients; not scored: 19 cells of the model's
    training/validation patients"``.
    """
    pairs = [(t, lab, s) for t, lab, s in zip(truth, labels, seen) if t is not None and lab is not None]
    if not pairs:
        return None
    held = [(t, lab) for t, lab, s in pairs if s is False]
    seen_n = sum(s is True for _, _, s in pairs)
    unknown = sum(s is None for _, _, s in pairs)
    k = sum(t == lab for t, lab in held)
    line = f"{k} of {len(held)} right, held-out patients"
    skipped = [f"{seen_n} cells of the model's training/validation patients"] if seen_n else []
    skipped += [f"{unknown} cells of patients not known to the model's split"] if unknown else []
    if skipped:
        line += "; not scored: " + ", ".join(skipped)
    return line
