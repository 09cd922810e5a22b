"""OnnxPredictor: classify cells with ONNX Runtime, no torch (the ``malaria-screen[runtime]`` install).

The ``.onnx`` file written by ``malaria-screen export`` carries everything: the network, the
normalisation (inside the graph), and the preprocessing config in its metadata
(``metadata_props['malaria_screen.config']``). The graph takes letterboxed cells
``(N, S, S, 3) uint8`` and returns softmax probabilities ``(N, num_classes) float32``
(see :mod:`malaria_screen.export.onnx`), so this back-end only decodes, letterboxes and calls
``InferenceSession.run``; decoding, batching and labelling are shared with the PyTorch
:class:`~malaria_screen.inference.predictor.Predictor` through
:class:`~malaria_screen.inference.base.CellClassifierBase`.

Imports: numpy, Pillow, onnxruntime and ``malaria_screen.{config,data.io,data.preprocess}``;
OpenCV is used for letterboxing when installed, else an identical numpy area resize
(:func:`malaria_screen.data.preprocess.area_resize`).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np

from malaria_screen.config import TrainConfig
from malaria_screen.inference.base import CellClassifierBase

__all__ = ["OnnxPredictor", "read_onnx_metadata", "ONNX_FILE_NAMES"]

log = logging.getLogger(__name__)

#: File names looked up, in order, when a model FOLDER is loaded with the ONNX back-end.
ONNX_FILE_NAMES: tuple[str, ...] = ("model.onnx", "model.int8.onnx")

_META_CONFIG = "malaria_screen.config"  # same keys as malaria_screen.export.onnx (which needs onnx/torch)
_META_METRICS = "malaria_screen.metrics"
_META_IO = "malaria_screen.onnx_io"
_IO_CONTRACT = "cells_nhwc_uint8->probs"
#: The contract of a graph that also returns the features the self-check needs (what
#: ``malaria_screen.export.onnx`` writes now); files with the older contract load, without features.
_IO_CONTRACT_FEATURES = "cells_nhwc_uint8->probs,features"
_FEATURES_OUTPUT = "features"


def read_onnx_metadata(session) -> dict[str, str]:
    """``metadata_props`` of a loaded model: ``{key: value}`` (strings)."""
    return dict(session.get_modelmeta().custom_metadata_map)


class OnnxPredictor(CellClassifierBase):
    """Classify cell images with an exported ONNX model through ONNX Runtime.

    Same interface as :class:`~malaria_screen.inference.predictor.Predictor`: ``predict``,
    ``predict_proba``, ``predict_proba_prepared``, ``predict_files``, ``label_of``,
    ``input_size``, ``threshold``, ``class_names``, ``positive_index``, ``source``, ``metrics``.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Of a model written by ``malaria-screen export`` (input ``cells`` ``(N, S, S, 3) uint8``,
        output ``probs`` ``(N, C) float32``).
    config : TrainConfig
    metrics : dict, optional
    batch_size : int, default=256
        Cells per ``session.run``.
    source : str, optional
        The ``.onnx`` path.
    precision : str, optional
        ``"fp32"``, ``"int8-qdq"``... from the metadata.
    seen_patients : dict, optional
        ``{"train": [...], "val": [...]}``: patients the model was trained and validated on
        (from the run's split, stored at export), so evaluation can leave them out.
    """

    backend = "onnx"

    def __init__(self, session, config: TrainConfig, *, metrics: dict | None = None, batch_size: int = 256,
                 source: str | None = None, precision: str | None = None,
                 seen_patients: dict[str, list[str]] | None = None) -> None:
        super().__init__(config, metrics=metrics, batch_size=batch_size, source=source)
        self.session = session
        self.precision = precision
        self.seen_patients = seen_patients or {}
        self.num_threads: int | None = None  # intra-op threads asked of from_file (None: ONNX Runtime's)
        self.providers: list[str] | None = None  # execution providers asked of from_file (None: CPU)
        self._single_thread: OnnxPredictor | None = None  # overlapped_inference's session, loaded once
        self._single_lock = threading.Lock()
        self._file_id: tuple[int, int, int] | None = None  # the loaded file's (inode, size, mtime)
        self._data: bytes | None = None  # the loaded file's bytes (pickling, single_threaded)
        #: The parasitemia estimator's parameters stored at export (``malaria_screen.quantify``), or None.
        self.quantify_params: dict | None = None
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name
        names = [o.name for o in session.get_outputs()]
        self._features = _FEATURES_OUTPUT if _FEATURES_OUTPUT in names[1:] else None

    def __reduce__(self):
        """Pickled as the bytes of its file (an ONNX Runtime session cannot be pickled; the file's
        path may not exist on another machine of a Ray cluster): unpickling builds the session
        again from them, with the same batch size and threads, and keeps :attr:`source` as its name.

        Raises
        ------
        TypeError
            If the predictor was not loaded from a file (``source`` is None).
        """
        if not self.source:
            raise TypeError("cannot pickle an OnnxPredictor that was not loaded from a file")
        return (_reload, (self.source, self.batch_size, self.num_threads, self._data))

    @classmethod
    def from_file(cls, path: str | Path, *, batch_size: int = 256, num_threads: int | None = None,
                  providers: list[str] | None = None, allow_spinning: bool = False) -> "OnnxPredictor":
        """Load an ``.onnx`` file, or the first of :data:`ONNX_FILE_NAMES` in a folder.

        Parameters
        ----------
        path : path
            A ``.onnx`` file written by ``malaria-screen export``, or a folder holding one.
        batch_size : int, default=256
        num_threads : int, optional
            ONNX Runtime intra-op threads; default: ONNX Runtime's (one per physical core).
        providers : list of str, optional
            Execution providers; default ``["CPUExecutionProvider"]``.
        allow_spinning : bool, default=False
            Let idle ONNX Runtime threads busy-wait for work. Off by default: in
            :meth:`predict_files` the decoding threads share the cores with inference, and
            spinning threads take CPU time from them (measured slower end to end on 2 cores).

        Raises
        ------
        FileNotFoundError
            If the file (or a model file in the folder) does not exist.
        ValueError
            If the file is not a malaria-screen ONNX model (no config in its metadata) or its
            input/output contract differs.
        """
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ONNX_FILE_NAMES if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"no ONNX model in {path} (looked for {', '.join(ONNX_FILE_NAMES)}); "
                                        "create one with `malaria-screen export`")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"no such ONNX model: {path}")
        pred = cls._from_bytes(path.read_bytes(), str(path), batch_size=batch_size, num_threads=num_threads,
                               providers=providers, allow_spinning=allow_spinning)
        pred._file_id = _file_id(path)
        return pred

    @classmethod
    def _from_bytes(cls, data: bytes, path: str, *, batch_size: int = 256, num_threads: int | None = None,
                    providers: list[str] | None = None, allow_spinning: bool = False) -> "OnnxPredictor":
        """:meth:`from_file`'s work on the file's bytes (``path``: its name, for :attr:`source` and messages)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            so.intra_op_num_threads = int(num_threads)
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        try:
            session = ort.InferenceSession(data, sess_options=so, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types (InvalidGraph, Fail...)
            raise ValueError(f"cannot load ONNX model {path}: {exc}") from exc
        meta = read_onnx_metadata(session)
        if _META_CONFIG not in meta:
            raise ValueError(f"{path} has no {_META_CONFIG!r} metadata: not exported by `malaria-screen export`")
        if meta.get(_META_IO, _IO_CONTRACT) not in (_IO_CONTRACT, _IO_CONTRACT_FEATURES):
            raise ValueError(f"{path}: unsupported graph contract {meta.get(_META_IO)!r} "
                             f"(expected {_IO_CONTRACT!r} or {_IO_CONTRACT_FEATURES!r})")
        cfg = TrainConfig.from_dict(json.loads(meta[_META_CONFIG]))
        inp = session.get_inputs()[0]
        if inp.type != "tensor(uint8)" or len(inp.shape) != 4:
            raise ValueError(f"{path}: input must be (N, S, S, 3) uint8, got {inp.shape} {inp.type}")
        metrics = json.loads(meta.get(_META_METRICS) or "{}")
        pred = cls(session, cfg, metrics=metrics, batch_size=batch_size, source=str(path),
                   precision=meta.get("malaria_screen.precision"),
                   seen_patients=json.loads(meta.get("malaria_screen.seen_patients") or "{}"))
        pred.num_threads = num_threads
        pred.providers = providers
        try:  # the parasitemia estimator's parameters of the run it was exported from (evaluation.quantify)
            carried = json.loads(meta.get("malaria_screen.quantify") or "null")
        except ValueError:
            carried = None
        pred.quantify_params = carried if isinstance(carried, dict) else None
        pred._data = data
        return pred

    def overlapped_inference(self):
        """Inference for :meth:`predict_files` while its workers decode on every core: a second
        session of the same file with one intra-op thread (loaded once, about 5 ms), whose
        probabilities are the same computation.

        ONNX Runtime's default of one thread per core only adds hand-offs when the cores are
        busy decoding: the int8 model cost 0.097 ms of CPU per cell on one thread against 0.122 ms
        on two (batch 256, 4,096 NIH cells, machine shared). This predictor's own
        :meth:`predict_proba_prepared` is returned when it already runs one thread, has no file,
        or uses other providers than the CPU's, and when its file changed since it was loaded.
        """
        if self.num_threads == 1 or not self.source or self.providers not in (None, ["CPUExecutionProvider"]):
            return self.predict_proba_prepared
        with self._single_lock:
            if self._single_thread is None:
                if self._file_id is None or _file_id(Path(self.source)) != self._file_id:
                    return self.predict_proba_prepared  # not the file this session runs
                self._single_thread = OnnxPredictor.from_file(self.source, batch_size=self.batch_size, num_threads=1)
        return self._single_thread.predict_proba_prepared

    def predict_proba_prepared(self, cells: np.ndarray) -> np.ndarray:
        """Class probabilities of letterboxed cells.

        Parameters
        ----------
        cells : (N, S, S, 3) ndarray of uint8
            Already at the model's input size (other dtypes are clipped to [0, 255] and cast).

        Returns
        -------
        probs : (N, num_classes) ndarray of float32

        Raises
        ------
        ValueError
            If the shape is not ``(N, S, S, 3)``.
        """
        self._check_cells(cells)
        if cells.dtype != np.uint8:
            cells = np.clip(cells, 0, 255).astype(np.uint8)
        out = np.empty((len(cells), len(self.class_names)), dtype=np.float32)
        for s in range(0, len(cells), self.batch_size):
            x = np.ascontiguousarray(cells[s : s + self.batch_size])
            out[s : s + len(x)] = self.session.run([self._output], {self._input: x})[0]
        return out


    def worker_classifier(self) -> "OnnxPredictor | None":
        """The copy :meth:`predict_files`' worker processes classify with: this model on one
        intra-op thread (:meth:`single_threaded`; pickled as the bytes it was loaded from, so a
        file rewritten since does not matter), or None when it runs on other execution providers
        than the CPU's or was not loaded from a file.

        With the workers classifying, this process only collects probabilities: 4,529 NIH PNG
        cells/s against 4,172 with inference here, same probabilities to the last bit (6,982
        cells, int8 model, 2 cores; ``benchmarks/bench_predict.py``, twenty-fourth stop).
        """
        if self._data is None or not self.source or self.providers not in (None, ["CPUExecutionProvider"]):
            return None
        return self.single_threaded()

    def single_threaded(self) -> "OnnxPredictor":
        """This model on one intra-op thread, for a worker process that shares the cores with other
        workers (``smear --workers``): itself when it already runs one thread or has no file, else
        the same file loaded again with ``num_threads=1`` (the same computation)."""
        if self.num_threads == 1 or self._data is None:
            return self
        return OnnxPredictor._from_bytes(self._data, self.source, batch_size=self.batch_size, num_threads=1,
                                         providers=self.providers)

    @property
    def gives_features(self) -> bool:
        """Whether the graph also returns the penultimate features (:meth:`predict_with_features`):
        files exported before that output existed do not, and the self-check is then off."""
        return self._features is not None

    def predict_with_features(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Probability of Parasitized and the penultimate features of each image, in one pass.

        The graph's ``features`` output: the input of the network's last linear layer, as
        :meth:`malaria_screen.inference.predictor.Predictor.predict_with_features` reads it from the
        PyTorch model (fp32: the same to float rounding; int8: the quantised network's), which the
        self-check (:mod:`malaria_screen.smear.domain`) measures distances in.

        Parameters
        ----------
        images : one image, or a sequence of images
            As :meth:`predict` reads them.

        Returns
        -------
        p_parasitized : (N,) ndarray of float32
        features : (N, D) ndarray of float32

        Raises
        ------
        ValueError
            If the graph has no ``features`` output (re-export it with ``malaria-screen export``),
            the model has no positive class, or an image cannot be decoded.
        """
        if self._features is None:
            raise ValueError(f"{self.source}: this ONNX graph has no 'features' output; re-export it with "
                             "`malaria-screen export` to run the self-check on it")
        if self.positive_index is None:
            raise ValueError(f"model classes {self.class_names} have no {self.config.positive_class!r}")
        cells = self.prepare_all(images)
        probs, feats = [], []
        for s in range(0, len(cells), self.batch_size):
            pr, ft = self.session.run([self._output, self._features], {self._input: np.ascontiguousarray(cells[s : s + self.batch_size])})
            probs.append(pr[:, self.positive_index])
            feats.append(ft.reshape(len(ft), -1))
        if not probs:
            return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(probs).astype(np.float32), np.concatenate(feats).astype(np.float32)


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of a file, or None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _reload(source: str, batch_size: int, num_threads: int | None, data: bytes | None = None) -> OnnxPredictor:
    """Unpickle an :class:`OnnxPredictor`: from the pickled bytes of its file (or, for a pickle
    without them, the file at ``source``)."""
    if data is None:
        return OnnxPredictor.from_file(source, batch_size=batch_size, num_threads=num_threads)
    return OnnxPredictor._from_bytes(data, source, batch_size=batch_size, num_threads=num_threads)
