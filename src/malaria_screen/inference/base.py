"""What every cell-classifier back-end shares, with no torch: decoding, batching, labelling.

A back-end (:class:`~malaria_screen.inference.predictor.Predictor` for PyTorch,
:class:`~malaria_screen.inference.onnx_predictor.OnnxPredictor` for ONNX Runtime) subclasses
:class:`CellClassifierBase` and implements one method, :meth:`~CellClassifierBase.predict_proba_prepared`
(letterboxed ``(N, S, S, 3) uint8`` cells to ``(N, num_classes)`` probabilities). Decoding by
content (:func:`malaria_screen.data.io.decode_image`), letterboxing
(:func:`malaria_screen.data.preprocess.letterbox`), thresholding and the file loop whose decoding
overlaps inference are written once, here.

This module imports numpy, Pillow and ``malaria_screen.{config,data.io,data.preprocess}`` only, so
it works in the torch-free ``malaria-screen[runtime]`` install.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from malaria_screen.config import TrainConfig
from malaria_screen.errors import error_text
from malaria_screen.data.io import (
    MAX_PIXELS,
    ImageDecodeError,
    ImageSource,
    PixelBudget,
    SizeHook,
    decode_image,
)
from malaria_screen.data.parallel import CLASSIFY_CHUNK, default_workers, iter_classified_cells, iter_prepared_cells, prepare_cell
from malaria_screen.data.preprocess import letterbox

__all__ = ["CellClassifierBase", "FileResult", "decode_fast", "default_model_dir", "iter_file_batches", "prepare_or_error",
           "seen_patients"]

log = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """Folder of the bundled default model (``malaria_screen/assets/default_model``)."""
    return Path(str(resources.files("malaria_screen") / "assets" / "default_model"))


def decode_fast(source: ImageSource, *, max_pixels: int = MAX_PIXELS, on_size: SizeHook | None = None) -> np.ndarray:
    """:func:`~malaria_screen.data.io.decode_image`, kept under its old name.

    The fast decoders (libspng for PNG, libjpeg-turbo for JPEG, OpenCV for lossless WebP, each
    with Pillow's pixels) now live in :func:`~malaria_screen.data.io.decode_image` itself, so
    every caller gets them; see :func:`~malaria_screen.data.io.fast_decoders`.
    """
    return decode_image(source, max_pixels=max_pixels, on_size=on_size)


@dataclass(frozen=True)
class FileResult:
    """Prediction for one file.

    Attributes
    ----------
    path : str
    label : str or None
        Predicted class name; None if the file failed.
    p_parasitized : float or None
        Probability of Parasitized in [0, 1]; None if failed or the model has no such class.
    error : str or None
        Why the file failed, else None.
    """

    path: str
    label: str | None
    p_parasitized: float | None
    error: str | None = None


def prepare_or_error(prepare: Callable[[ImageSource], np.ndarray], source: ImageSource
                     ) -> tuple[np.ndarray | None, str | None]:
    """``(prepare(source), None)``, or ``(None, error text)`` when it raises (any ``Exception``).

    The error text is :func:`~malaria_screen.errors.error_text`, an ``ImageDecodeError``'s
    message shown alone ("not an image", "grayscale", ...).
    """
    try:
        return prepare(source), None
    except Exception as exc:  # noqa: BLE001 - never lose the batch to one odd file
        return None, error_text(exc, plain=ImageDecodeError)


def iter_file_batches(
    paths: Sequence[str], prepare: Callable[[str], np.ndarray], *, chunk: int, workers: int
) -> Iterator[tuple[list[str], list[tuple[np.ndarray | None, str | None]]]]:
    """Decode files in a thread pool, one batch ahead of the consumer.

    Parameters
    ----------
    paths : sequence of str
    prepare : callable
        ``prepare(path) -> (S, S, 3) uint8``; exceptions become per-file error strings.
    chunk : int
        Files per yielded batch (>= 1).
    workers : int
        Decoding threads (>= 1). Decoders (libwebp, libpng, zlib) release the GIL, so the
        threads run on all cores while the consumer runs inference on the previous batch.

    Yields
    ------
    batch : list of str
        The paths of this batch, in input order.
    decoded : list of (ndarray or None, str or None)
        Per path: the prepared cell, or None and the error message.
    """
    if chunk < 1 or workers < 1:
        raise ValueError(f"chunk and workers must be >= 1, got chunk={chunk}, workers={workers}")
    batches = [list(paths[i : i + chunk]) for i in range(0, len(paths), chunk)]
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        load = lambda p: prepare_or_error(prepare, p)  # noqa: E731
        ahead = max(2, -(-2 * workers // chunk))  # keep every thread busy even at chunk=1
        pending = [pool.map(load, b) for b in batches[:ahead]]
        for bi, batch in enumerate(batches):
            decoded = list(pending[bi])
            pending[bi] = None  # free
            if bi + ahead < len(batches):
                pending.append(pool.map(load, batches[bi + ahead]))
            yield batch, decoded


def seen_patients(model) -> dict[str, set[str]]:
    """Patients (or fields) a loaded model was trained and validated on: ``{"train": set, "val": set}``.

    From the model's ``seen_patients`` attribute (ONNX metadata, ensembles) or else its run
    folder's ``split.json``; empty sets when neither exists."""
    out: dict[str, set[str]] = {"train": set(), "val": set()}
    if getattr(model, "seen_patients", None):
        for k in out:
            out[k] |= set(model.seen_patients.get(k, []))
        return out
    src = getattr(model, "source", None)
    split = Path(src) / "split.json" if src and Path(src).is_dir() else None
    if split is not None and split.is_file():
        man = json.loads(split.read_text())
        for k in out:
            out[k] |= set(man.get("splits", {}).get(k, {}).get("patients", []))
    return out


def _image_list(images) -> list:
    """One image, or a sequence (or ``(N, H, W, C)`` array) of images, as a list of images.

    Raises
    ------
    TypeError
        If ``images`` is None or neither an image nor iterable.
    ImageDecodeError
        If ``images`` is an ndarray of neither 2, 3 nor 4 dimensions.
    """
    if images is None:
        raise TypeError("images is None: pass a path, bytes, a PIL image, an ndarray, or a sequence of them")
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):  # (H, W) or (H, W, C): one image
            return [images]
        if images.ndim == 4:  # (N, H, W, C): a batch
            return list(images)
        raise ImageDecodeError(f"expected an (H, W[, C]) image or (N, H, W, C) batch array, got shape {images.shape}")
    if isinstance(images, (str, os.PathLike, bytes, bytearray)) or hasattr(images, "mode"):  # hasattr: PIL image
        return [images]
    try:
        return list(images)
    except TypeError:
        raise TypeError(f"expected an image or a sequence of images, got {type(images).__name__}") from None


class CellClassifierBase:
    """Shared behaviour of cell classifiers; subclasses implement :meth:`predict_proba_prepared`.

    Parameters
    ----------
    config : TrainConfig
        Input size, class names, positive class and threshold are read from it.
    metrics : dict, optional
        Test-patient metrics shipped with the model, for display.
    batch_size : int, default=256
        Cells per inference call.
    source : str, optional
        Where the model was loaded from (a run folder or an ``.onnx`` file).
    """

    backend: str = "base"

    #: Fewest files for which :meth:`predict_files` decodes in worker processes by default.
    PROCESS_MIN_FILES: int = 512

    def __init__(self, config: TrainConfig, *, metrics: dict | None = None, batch_size: int = 256,
                 source: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.metrics = metrics or {}
        self.batch_size = batch_size
        self.source = source
        self._pixel_budget = PixelBudget()  # memory of predict_files' decoding threads (prepare_file)

    def __getstate__(self) -> dict:
        """Pickled without the pixel budget (a lock; each process has its own), so that worker
        processes (``smear --workers``) and Ray actors can receive the model."""
        state = self.__dict__.copy()
        state.pop("_pixel_budget", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pixel_budget = PixelBudget()

    # -- properties ---------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """Side of the square model input, px."""
        return self.config.input_size

    @property
    def threshold(self) -> float:
        """Decision threshold on p_parasitized."""
        return self.config.threshold

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def positive_index(self) -> int | None:
        return self.config.positive_index

    # -- core ---------------------------------------------------------------------------------
    def prepare(self, image: ImageSource) -> np.ndarray:
        """Decode (:func:`decode_fast`) and letterbox one image: ``(S, S, 3) uint8``.

        Raises :class:`ImageDecodeError`."""
        return letterbox(decode_fast(image), self.input_size)

    def prepare_file(self, image: ImageSource) -> np.ndarray:
        """:meth:`prepare` for a user's cell file: also refuses an image under
        :data:`~malaria_screen.data.io.MIN_CELL_SIDE` px on a side (:func:`check_cell_size`) and
        a grayscale one (:func:`check_colour`).

        Threads calling it share this classifier's :class:`~malaria_screen.data.io.PixelBudget`:
        at most :data:`~malaria_screen.data.io.MAX_PIXELS` pixels are being decoded and
        letterboxed at once, however many threads decode (a 100 Mpx file waits for the others).

        Raises :class:`ImageDecodeError`."""
        with self._pixel_budget.session() as on_size:
            return prepare_cell(image, self.input_size, on_size=on_size)

    def predict_proba_prepared(self, cells: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """Class probabilities ``(N, num_classes) float32`` of letterboxed ``(N, S, S, 3) uint8`` cells."""
        raise NotImplementedError

    def overlapped_inference(self) -> Callable[[np.ndarray], np.ndarray]:
        """The inference :meth:`predict_files` runs while its decoding workers use the cores.

        ``infer(cells)``: letterboxed ``(N, S, S, 3) uint8`` cells to ``(N, num_classes)``
        float32 probabilities, as :meth:`predict_proba_prepared` (the default). A back-end may
        return a cheaper one: :class:`~malaria_screen.inference.onnx_predictor.OnnxPredictor`
        runs a one-thread session, because with every core decoding an intra-op thread per core
        only adds synchronisation (about a fifth more CPU per cell for the int8 model).
        """
        return self.predict_proba_prepared

    def worker_classifier(self) -> "CellClassifierBase | None":
        """A picklable copy of this classifier that :meth:`predict_files`' worker processes run
        themselves (each decodes, letterboxes **and classifies** its chunks), or None to classify
        here what the workers prepare (the default).

        A back-end returns one when the copy gives the same probabilities in a worker as this
        classifier does here and is cheap to send and load:
        :class:`~malaria_screen.inference.onnx_predictor.OnnxPredictor` on the CPU does (its
        file's bytes, one intra-op thread per worker).
        """
        return None

    def _check_cells(self, cells: np.ndarray) -> None:
        s = self.input_size
        if cells.ndim != 4 or cells.shape[1:] != (s, s, 3):
            raise ValueError(f"expected (N, {s}, {s}, 3) uint8 cells, got {cells.shape}")

    def predict_proba(self, images: Sequence[ImageSource] | ImageSource) -> np.ndarray:
        """Class probabilities ``(N, num_classes) float32`` of images (paths, bytes, PIL, arrays).

        ``images`` is read as :meth:`predict` reads it: one image, or a sequence of images.

        Raises
        ------
        ImageDecodeError
            If any image cannot be decoded; the message starts with the image's index
            (``"image 2: ..."``). Use :meth:`predict_files` to get per-file errors instead.
        TypeError
            If ``images`` (or one item of it) is not an image source; the message names the index.
        """
        cells = self.prepare_all(images)
        if len(cells) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return self.predict_proba_prepared(cells)

    def prepare_all(self, images: Sequence[ImageSource] | ImageSource) -> np.ndarray:
        """:meth:`prepare` every image of ``images`` (read as :meth:`predict` reads it): ``(N, S, S, 3) uint8``.

        Raises
        ------
        ImageDecodeError
            If any image cannot be decoded; the message starts with the image's index.
        TypeError
            If ``images`` (or one item of it) is not an image source; the message names the index.
        """
        items = _image_list(images)
        s = self.input_size
        if len(items) == 0:
            return np.zeros((0, s, s, 3), dtype=np.uint8)
        cells = []
        for i, im in enumerate(items):
            try:
                cells.append(self.prepare(im))
            except ImageDecodeError as exc:
                raise ImageDecodeError(f"image {i}: {exc}") from exc
            except TypeError as exc:
                raise TypeError(f"image {i}: {exc}") from exc
        return np.stack(cells)

    def predict(self, images: Sequence[ImageSource] | ImageSource) -> np.ndarray:
        """Probability of Parasitized for each image.

        Parameters
        ----------
        images : one image, or a sequence of images
            An image is a path, bytes, a PIL image, or an ``(H, W)`` / ``(H, W, C)`` ndarray
            (uint8, uint16, bool, or float in [0, 1]); an ``(N, H, W, C)`` ndarray is N images.

        Returns
        -------
        p_parasitized : (N,) ndarray of float32

        Raises
        ------
        ValueError
            If the model has no ``positive_class`` (multi-class models: use
            :meth:`predict_proba`), or an image cannot be decoded (:class:`ImageDecodeError`,
            whose message starts with the image's index).
        TypeError
            If ``images`` is None or not an image or a sequence of images.
        """
        if self.positive_index is None:
            raise ValueError(f"model classes {self.class_names} have no {self.config.positive_class!r}; use predict_proba")
        return self.predict_proba(images)[:, self.positive_index]

    def label_of(self, probs: np.ndarray) -> list[str]:
        """Class names of ``(N, num_classes)`` probabilities: threshold on Parasitized for
        binary models, arg-max otherwise."""
        names, pos = self.class_names, self.positive_index  # properties: read once, not per cell
        if pos is not None and len(names) == 2:
            return [names[pos] if hit else names[1 - pos] for hit in (probs[:, pos] >= self.threshold).tolist()]
        return [names[i] for i in probs.argmax(1).tolist()]

    def predict_files(self, paths: Iterable[str | Path], *, workers: int | None = None, chunk: int | None = None,
                      processes: bool | None = None) -> Iterator[FileResult]:
        """Classify files in batches; a bad file yields an error result and the rest go on.

        A file that cannot be decoded, or is too small to be a cell crop, or grayscale
        (:meth:`prepare_file`), gets a result with ``error`` set.

        Decoding runs ahead of, and overlaps, inference of the previous batch: in ``workers``
        processes (:func:`~malaria_screen.data.parallel.iter_prepared_cells`; every core busy,
        files over 4 Mpx decoded here under the pixel budget) or in ``workers`` threads sharing
        this classifier's :class:`~malaria_screen.data.io.PixelBudget`. With processes, a
        classifier that has a :meth:`worker_classifier` is run by the workers themselves
        (:func:`~malaria_screen.data.parallel.iter_classified_cells`), with the same answers.

        Parameters
        ----------
        paths : iterable of path
        workers : int, optional
            Decoding processes, or threads; default: the usable cores (processes), or
            ``min(8, cores + 2)`` (threads).
        chunk : int, optional
            Files per inference batch; default ``batch_size``.
        processes : bool, optional
            Decode in worker processes. Default: when there are more than
            :attr:`PROCESS_MIN_FILES` files and more than one core (starting processes costs
            about 0.3 s of CPU, worth it from a few hundred cells on).

        Yields
        ------
        FileResult
            In input order.
        """
        paths = [str(p) for p in paths]
        chunk = chunk or self.batch_size
        if processes is None:
            processes = len(paths) > self.PROCESS_MIN_FILES and (workers or default_workers()) > 1
        if processes:
            workers = workers or default_workers()
            remote = self.worker_classifier()
            if remote is not None:  # workers classify: only probabilities come back
                rows = iter_classified_cells(paths, self.input_size, workers=workers, classifier=remote,
                                             local=self._classify_file, chunk=self._worker_chunk(len(paths), workers))
                batches = ((paths[i : i + chunk], [next(rows) for _ in range(min(chunk, len(paths) - i))])
                           for i in range(0, len(paths), chunk))
                yield from self._predict_batches(batches, lambda probs: probs)  # the rows are probabilities already
                return
            cells = iter_prepared_cells(paths, self.input_size, workers=workers, local=self.prepare_file)
            batches = ((paths[i : i + chunk], [next(cells) for _ in range(min(chunk, len(paths) - i))])
                       for i in range(0, len(paths), chunk))
        else:
            workers = workers or min(8, default_workers() + 2)
            batches = iter_file_batches(paths, self.prepare_file, chunk=chunk, workers=workers)
        yield from self._predict_batches(batches, self.overlapped_inference() if paths else self.predict_proba_prepared)

    def _classify_file(self, path: str) -> np.ndarray:
        """``(num_classes,) float32`` probabilities of one cell file, here (:meth:`prepare_file`)."""
        return self.predict_proba_prepared(self.prepare_file(path)[None])[0]

    @staticmethod
    def _worker_chunk(n_files: int, workers: int) -> int:
        """Files per worker task: :data:`~malaria_screen.data.parallel.CLASSIFY_CHUNK`, fewer when
        that would not give every worker 4 tasks (the last tasks would leave cores idle)."""
        return max(8, min(CLASSIFY_CHUNK, -(-n_files // (4 * workers))))

    def classify_prepared(self, names: Sequence[str], prepared: Sequence[tuple[np.ndarray | None, str | None]]
                          ) -> list[FileResult]:
        """Classify cells prepared one by one, in one batch; the ones that failed keep their error.

        Parameters
        ----------
        names : sequence of str
            A name per item (file name or path), recorded as ``FileResult.path``.
        prepared : sequence of (cell or None, error or None)
            Letterboxed ``(S, S, 3) uint8`` cell, or None with the reason
            (:func:`prepare_or_error`).

        Returns
        -------
        list of FileResult
            In input order; an inference failure becomes every cell's error.
        """
        return list(self._predict_batches([(list(names), list(prepared))]))

    def _predict_batches(self, batches, infer: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[FileResult]:
        n_cls, pos = len(self.class_names), self.positive_index
        infer = infer or self.predict_proba_prepared
        for batch, decoded in batches:
            ok = [i for i, (img, _) in enumerate(decoded) if img is not None]
            if ok:
                try:
                    probs = infer(np.stack([decoded[i][0] for i in ok]))
                except Exception as exc:  # an inference failure fails this batch only, not the run
                    log.exception("inference failed on a batch of %d cells", len(ok))
                    err = f"inference failed: {error_text(exc)}"
                    decoded = [(None, e or err) for _, e in decoded]
                    ok, probs = [], np.zeros((0, n_cls), np.float32)
            else:
                probs = np.zeros((0, n_cls), np.float32)
            labels = self.label_of(probs) if ok else []
            p_pos = probs[:, pos].tolist() if pos is not None else [None] * len(ok)  # float32 -> float, exact
            by_i = {i: (labels[k], p_pos[k]) for k, i in enumerate(ok)}
            for i, p in enumerate(batch):
                if i in by_i:
                    lab, pp = by_i[i]
                    yield FileResult(path=p, label=lab, p_parasitized=pp)
                else:
                    yield FileResult(path=p, label=None, p_parasitized=None, error=decoded[i][1])
