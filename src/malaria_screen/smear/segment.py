"""Red-blood-cell segmentation for whole thin-smear fields.

Pure functions: arrays in, arrays out (no file I/O, no model).

Algorithm
---------
1. **Stain-robust foreground signal.** The background (plasma-free glass) colour is estimated
   from the brightest pixels of the field and every pixel is converted to optical density
   ``OD_c = -log((I_c + 1) / (B_c + 1))`` per channel ``c`` (Beer-Lambert,
   :func:`~malaria_screen.smear.density.optical_density`). Haemoglobin and the
   eosin component of Giemsa absorb mostly green light, so the green-channel OD separates red
   cells from background for pale-grey, pink and deep-magenta stains alike; it is insensitive to
   the illumination colour because it is relative to the field's own background.
2. **Scale.** The typical RBC diameter in pixels is either derived from ``pixel_size_um``
   (``rbc_diameter_um / pixel_size_um``, default 7.5 µm) or *estimated from the image*: on a
   coarse copy, the foreground (Otsu 1979 threshold, holes filled) is distance-transformed and
   the median of the per-object maxima of the distance transform (≈ the radius of one cell,
   even inside clumps of touching cells) gives the diameter. The field is then resized so that
   a cell is ``work_diameter_px`` across; all later parameters are fractions of that diameter,
   so the same defaults work on 1280x960 IML fields (≈ 80 px cells) and 640x480 Chula fields
   (≈ 40 px cells).
3. **Foreground.** Otsu threshold of the smoothed signal, central-pallor holes filled, specks
   (< ``min_area_frac`` of a cell) removed, small opening to cut thin bridges.
4. **Touching cells** are split by the marker-controlled watershed (Beucher & Meyer 1993) of the
   inverted, smoothed distance transform; markers are distance-transform peaks at least
   ~0.35 cell diameters apart and at least ~0.3 radii deep. This is the approach of the NLM
   Malaria Screener (Poostchi et al. 2018, Yang et al. 2020), which also segments cells with a
   threshold + distance-transform watershed before classifying each cell crop.
   Segments still larger than ``clump_area_frac`` cells (cells overlapping so much that their
   peaks merged) are covered greedily by discs of the typical cell radius; two or more discs
   split the segment (each pixel to the nearest disc centre) and box each cell by its disc.
5. **Exclusion.** White-blood-cell nuclei are much darker in the *red* channel than any red
   cell (purple/blue chromatin absorbs red light, haemoglobin and eosin barely do). Pixels whose
   red-channel OD exceeds the red-cell level of the field by a margin form nucleus blobs; blobs
   larger than ``wbc_nucleus_min_frac`` of a cell mark a WBC, and segments overlapping the
   (dilated) WBC are excluded. Intra-erythrocytic parasites are also dark but far smaller.
   Segments smaller than ``min_area_frac`` or larger than ``max_area_frac`` of a typical cell
   (debris, platelets, unsplit clumps) are excluded as well.
6. Segments touching the image border are flagged (``border=True``) and kept only if at least
   ``border_min_area_frac`` of a typical cell is visible.

References
----------
- N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. SMC 9(1), 1979.
- S. Beucher, F. Meyer, "The morphological approach to segmentation: the watershed
  transformation", in Mathematical Morphology in Image Processing, 1993.
- M. Poostchi et al., "Malaria parasite detection and cell counting for human and mouse using
  thin blood smear microscopy", J. Med. Imaging 5(4), 2018.
- F. Yang et al., "Deep learning for smartphone-based malaria parasite detection in thick blood
  smears" / NLM Malaria Screener, IEEE JBHI 24(5), 2020.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from malaria_screen.smear.density import check_field_rgb, optical_density

logger = logging.getLogger(__name__)

#: Typical diameter of a human red blood cell, µm.
RBC_DIAMETER_UM = 7.5

__all__ = [
    "RBC_DIAMETER_UM",
    "CellProps",
    "SegmentConfig",
    "Segmentation",
    "cell_properties",
    "estimate_rbc_diameter_px",
    "segment_cells",
    "segment_field",
]


@dataclass(frozen=True)
class SegmentConfig:
    """Settings of :func:`segment_field`; the CLI, the REST API, the rescorer and ``rescorer.json`` share it.

    The defaults are the shipped method, chosen on the IML_Malaria dev fields (the measurements
    behind each are in ``docs/experiments/segmentation-history.md``). Sizes are fractions of a
    typical cell, so the same defaults work at any magnification.

    Attributes
    ----------
    pixel_size_um : float, optional
        Pixel size at the specimen in µm/px. If given, the RBC diameter is
        ``rbc_diameter_um / pixel_size_um`` px; otherwise it is estimated from the image.
    rbc_diameter_um : float, default=7.5
        Typical RBC diameter in µm, used with ``pixel_size_um``.
    rbc_diameter_px : float, optional
        Typical RBC diameter in px; overrides both of the above.
    work_diameter_px : float, default=30
        Cells are processed at a resolution where they are this many px across (speed).
    min_area_frac, max_area_frac : float, default=0.3, 2.6
        Segments with area outside ``[min, max] x`` the area of a typical cell are excluded.
    border_min_area_frac : float, default=0.85
        Cells cut by the image border are kept only if at least this fraction of a typical
        cell's area is visible: a sliver of a cell cannot be classified (its parasite may lie
        outside the field) and is not counted, as a microscopist counting in a field ignores
        cells mostly outside it. IML_Malaria's annotators box border cells the same way.
    min_marker_distance_frac : float, default=0.36
        Minimum distance between two watershed markers, as a fraction of the RBC diameter.
    max_hole_frac : float, default=0.4
        Holes in the foreground up to this fraction of a cell area are filled (central pallor);
        larger ones are gaps between cells and stay background.
    threshold_factor : float, default=1.0
        The foreground threshold is this factor times Otsu's threshold of the green OD.
    split_clumps : bool, default=True
        Split segments larger than ``clump_area_frac`` typical cells (overlapping cells the
        watershed could not separate) by a greedy cover with cell-sized discs
        (:func:`_split_clumps`); split cells get the box of their disc (``Segmentation.boxes``).
        Unsplit segments above ``max_area_frac`` are dropped.
    clump_area_frac : float, default=1.5
        See ``split_clumps``.
    complete_boxes : bool, default=True
        Give each cell that touches other cells the box of the whole cell, fitted to the part
        of its outline that borders background (:func:`_complete_boxes`), instead of the box
        of its share of the touching group.
    exclude_wbc : bool, default=True
        Detect and exclude white blood cells by their dark nuclei.
    wbc_nucleus_min_frac : float, default=0.2
        Minimum area of a nucleus blob, as a fraction of a typical cell area.
    wbc_red_od_margin : float, default=0.15
        Red-channel OD margin above the 99th percentile of the field's cells that marks a
        nucleus pixel.
    wbc_green_od_margin : float, default=0.7
        Green-channel OD margin above the median of the field's cells that marks a nucleus pixel.
    mark_max_frac : float or None, default=0.15
        Cells under a neutral black mark burned into the image (scale bar, text: red-channel
        OD > 1.5, i.e. under 3 % transmitted red light, which stained cells and nuclei never
        reach) are excluded when more than this fraction of the cell lies within ``d / 12`` of
        the mark: they cannot be classified. None keeps them.
    pale_cell_factor : float or None, default=0.5
        Recover pale cells (:func:`_pale_cells`): cell-sized, convex regions whose green OD is
        above this factor times the foreground threshold but which the threshold left out.
        None turns the step off.

    Raises
    ------
    ValueError
        If ``pixel_size_um`` or ``rbc_diameter_px`` is given and not > 0.
    """

    pixel_size_um: float | None = None
    rbc_diameter_um: float = RBC_DIAMETER_UM
    rbc_diameter_px: float | None = None
    work_diameter_px: float = 30.0
    min_area_frac: float = 0.3
    max_area_frac: float = 2.6
    border_min_area_frac: float = 0.85
    min_marker_distance_frac: float = 0.36
    max_hole_frac: float = 0.4
    threshold_factor: float = 1.0
    split_clumps: bool = True
    clump_area_frac: float = 1.5
    complete_boxes: bool = True
    exclude_wbc: bool = True
    wbc_nucleus_min_frac: float = 0.2
    wbc_red_od_margin: float = 0.15
    wbc_green_od_margin: float = 0.7
    mark_max_frac: float | None = 0.15
    pale_cell_factor: float | None = 0.5

    def __post_init__(self) -> None:
        if self.pixel_size_um is not None and not self.pixel_size_um > 0:
            raise ValueError(f"pixel_size_um must be > 0, got {self.pixel_size_um}")
        if self.rbc_diameter_px is not None and not self.rbc_diameter_px > 0:
            raise ValueError(f"rbc_diameter_px must be > 0, got {self.rbc_diameter_px}")

    def to_dict(self) -> dict[str, Any]:
        """All settings as a JSON-ready dict (``asdict``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "SegmentConfig":
        """Settings from a dict of some or all fields (the rest keep their defaults).

        Reads :meth:`to_dict` output and the plain ``segment_kwargs`` dicts of older
        ``rescorer.json`` files (e.g. ``{}`` or ``{"pixel_size_um": 0.1}``).

        Raises
        ------
        ValueError
            If ``values`` is not a dict or names a setting that does not exist.
        """
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ValueError(f"segmentation settings must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown segmentation setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class CellProps:
    """Properties of one segmented cell.

    Attributes
    ----------
    id : int
        Label value in the label image (1..N).
    bbox : tuple of int
        ``(x, y, w, h)`` in px, top-left origin, full-resolution image coordinates.
    area_px : int
        Mask area in px.
    centroid : tuple of float
        ``(x, y)`` centre of mass in px.
    border : bool
        True if the cell touches the image border (probably cut by it).
    """

    id: int
    bbox: tuple[int, int, int, int]
    area_px: int
    centroid: tuple[float, float]
    border: bool


@dataclass
class Segmentation:
    """Result of :func:`segment_field`.

    Attributes
    ----------
    labels : np.ndarray
        ``(H, W)`` int32, 0 = background/excluded, 1..N = red blood cells.
    rbc_diameter_px : float
        Typical RBC diameter used, px (estimated or from ``pixel_size_um``).
    diameter_estimated : bool
        True if ``rbc_diameter_px`` was estimated from the image.
    scale : float
        Working-resolution / full-resolution size ratio used internally.
    wbc_boxes : list of tuple of int
        ``(x, y, w, h)`` px boxes of excluded white blood cells.
    n_excluded : int
        Number of other excluded objects (debris, platelets, clumps).
    boxes : dict
        Label -> ``(x, y, w, h)`` px box for cells that touch or overlap other cells: the whole
        cell (its disc in a split clump, :func:`_split_clumps`, and/or the circle fitted to its
        free outline, :func:`_complete_boxes`), larger than its mask, which is its share of
        the group.
    """

    labels: np.ndarray
    rbc_diameter_px: float
    diameter_estimated: bool
    scale: float
    wbc_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    n_excluded: int = 0
    boxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of labelled red blood cells."""
        return int(self.labels.max()) if self.labels.size else 0

    def cells(self, *, border_margin_px: int = 1) -> list[CellProps]:
        """:func:`cell_properties` of the labels, with the whole-cell boxes of touching cells."""
        return cell_properties(self.labels, border_margin_px=border_margin_px, boxes=self.boxes)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values))


def _fill_small_holes(mask: np.ndarray, max_hole_px: float | None) -> np.ndarray:
    """Fill holes (background regions not touching the border) up to ``max_hole_px`` px; all of
    them when ``max_hole_px`` is None.

    Holes are the 4-connected components of the background that do not touch the image border,
    so with no size limit the result equals ``scipy.ndimage.binary_fill_holes`` (whose default
    structure is the same 4-connectivity) at about a third of its CPU: one labelling pass instead
    of an iterated dilation (``tests/smear/test_segment_speed.py`` checks both on real fields).
    """
    from scipy import ndimage as ndi

    holes, n = ndi.label(~mask)
    if n == 0:
        return mask
    if max_hole_px is None:
        fill = np.ones(n + 1, bool)
    else:
        fill = np.bincount(holes.ravel()) <= max_hole_px
    fill[0] = False
    # Background regions touching the image border are not holes.
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill[edge] = False
    return mask | fill[holes]


def _foreground_mask(
    signal: np.ndarray, min_object_px: int, max_hole_px: float | None = None, factor: float = 1.0
) -> tuple[np.ndarray, float]:
    """Otsu foreground of ``signal`` (x ``factor``, at least 0.08 OD), holes filled, specks removed;
    returns ``(mask, threshold)``."""
    from scipy import ndimage as ndi

    threshold = factor * _otsu(signal[:: max(1, signal.shape[0] // 300), :: max(1, signal.shape[1] // 300)])
    # Guard against fields with no cells: the threshold must be a real contrast.
    threshold = max(threshold, 0.08)
    mask = signal > threshold
    mask = _fill_small_holes(mask, max_hole_px)
    if min_object_px > 1:
        objects, n = ndi.label(mask)
        if n:
            sizes = np.bincount(objects.ravel())
            keep = sizes >= min_object_px
            keep[0] = False
            mask = keep[objects]
    return mask, threshold


def estimate_rbc_diameter_px(rgb: np.ndarray, *, od: np.ndarray | None = None, dense_coverage: float = 0.75) -> float:
    """Estimate the typical red-cell diameter of a field from the image alone.

    The coarse foreground's distance transform is maximal near each cell's centre with a
    value ≈ the cell radius, whether the cell is isolated or in a clump of touching cells; the
    median of the per-object maxima (objects with tiny maxima, i.e. specks, ignored) is taken.
    Holes (the pale centre of a cell) are filled first, except in a dense field: when the filled
    foreground covers more than ``dense_coverage`` of the field, the "holes" were the background
    between packed cells (filling them made one field-sized object), so the unfilled foreground
    is used.

    The field is analysed at 480 px on its longer side. In a field larger than 1,280 px (a
    stitched scan, a high-resolution camera) small cells would then be a few pixels across and
    merge, so the estimate is also taken on its central 1,280 x 1,280 px (at the same 480 px);
    that one is used when it finds at least 10 cells and a diameter under 0.9 x the whole-field
    estimate. Fields of up to 1,280 px, such as all of IML's and Chula's, are unaffected.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    od : np.ndarray, optional
        Precomputed :func:`~malaria_screen.smear.density.optical_density` of ``rgb``.
    dense_coverage : float, default=0.75
        Foreground share (0..1) above which holes are not filled. Thin-smear monolayers in the
        IML and Chula fields cover at most ~0.58 once filled.

    Returns
    -------
    float
        Estimated RBC diameter in px (full resolution). Returns NaN if no cell-like object is
        found.
    """
    rgb = check_field_rgb(rgb)
    if od is None:
        od = optical_density(rgb)
    g = od[..., 1]
    diam, _ = _diameter_of(g, dense_coverage)
    h, w = g.shape
    side = 1280
    if max(h, w) > side:
        y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
        d_crop, n_crop = _diameter_of(g[y0 : y0 + side, x0 : x0 + side], dense_coverage)
        if n_crop >= 10 and (not np.isfinite(diam) or d_crop < 0.9 * diam):
            logger.info("large field: RBC diameter %.1f px from the central crop (%.1f px from the whole field)",
                        d_crop, diam)
            diam = d_crop
    return diam


def _diameter_of(g: np.ndarray, dense_coverage: float) -> tuple[float, int]:
    """``(diameter px, number of cells found)`` of ``(H, W)`` float32 green OD ``g``, analysed at
    480 px on its longer side (see :func:`estimate_rbc_diameter_px`); ``(NaN, 0)`` if none."""
    import cv2
    from skimage.feature import peak_local_max

    h, w = g.shape
    s = min(1.0, 480.0 / max(h, w))
    if s < 1.0:
        g = cv2.resize(g, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    g = cv2.GaussianBlur(g, (0, 0), 1.0)
    mask, _ = _foreground_mask(g, min_object_px=12)
    if mask.mean() > dense_coverage:
        mask, _ = _foreground_mask(g, min_object_px=12, max_hole_px=0)
    if not mask.any():
        return float("nan"), 0
    dt = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    # Peaks of the distance transform: one near the centre of every cell, isolated or in a
    # clump; a cell's peak value is ~ its radius.
    peaks = peak_local_max(dt, min_distance=3, threshold_abs=2.0, exclude_border=True)
    maxima = dt[peaks[:, 0], peaks[:, 1]].astype(np.float64) if len(peaks) else np.zeros(0)
    if maxima.size == 0:
        return float("nan"), 0
    # Ignore fragments much thinner than the bulk of the objects.
    maxima = maxima[maxima >= 0.5 * np.percentile(maxima, 75)]
    radius = float(np.median(maxima))
    return (2.0 * radius + 1.0) / s, int(maxima.size)


@dataclass(frozen=True)
class _WorkScale:
    """The working resolution: full-resolution ``diameter_px``, resize ``factor`` and output
    ``size`` ``(w, h)``, per-axis factors ``fx``/``fy``, and a typical cell's ``diameter``,
    ``radius`` and ``cell_area`` at working resolution (px)."""

    diameter_px: float
    factor: float
    size: tuple[int, int]
    fx: float
    fy: float
    diameter: float
    radius: float
    cell_area: float


def segment_field(rgb: np.ndarray, config: SegmentConfig | None = None) -> Segmentation:
    """Segment the red blood cells of one thin-smear field (algorithm: module docstring).

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 RGB field, any size.
    config : SegmentConfig, optional
        Settings; default ``SegmentConfig()``.

    Returns
    -------
    Segmentation
        Labels ``(H, W)`` int32 at full resolution and metadata.

    Raises
    ------
    ValueError
        If ``rgb`` is not ``(H, W, 3)`` or smaller than 8 x 8 px.
    """
    cfg = config or SegmentConfig()
    rgb = check_field_rgb(rgb)
    od = optical_density(rgb)
    seg = _segment_od(rgb, od, cfg)
    if seg.labels.any():
        return seg
    # No cell. Two kinds of overlay can cause that, and only then (a field that segments is left
    # exactly as it is) is the field segmented again without them: near-black pixels (a frame, a
    # strip, a reticle, the round surround of a photo through the eyepiece; optical density ~5
    # against ~0.1-0.5 for cells) take Otsu's threshold for themselves, so cells and glass both
    # fall below it: they count as glass for the threshold and stay marks, out of the foreground;
    # and saturated white pixels (a caption strip, a label) taken for the glass make the dimmer
    # real glass look stained: they are left out of the background estimate.
    black = od[..., 0] > MARK_OD
    white = bool((rgb.min(axis=2) >= 250).any())
    if not black.any() and not white:
        return seg
    od = optical_density(rgb, skip_saturated=True) if white else od.copy()
    od[..., 1][black] = 0.0
    retry = _segment_od(rgb, od, cfg)
    if retry.labels.any():
        logger.info("overlay pixels (%.1f %% near-black%s) hid the cells; segmented without them", 100 * black.mean(),
                    ", saturated white ones" if white else "")
        return retry
    return seg


#: Optical density of the red channel above which a pixel is a neutral black mark (scale bar, text,
#: a frame): every channel absorbs, where a stained cell passes red light.
MARK_OD = 1.5


def _segment_od(rgb: np.ndarray, od: np.ndarray, cfg: SegmentConfig) -> Segmentation:
    """:func:`segment_field` from the field's optical density ``od`` (``(H, W, 3)`` float32)."""
    height, width = rgb.shape[:2]
    diameter_px, estimated = _rbc_diameter(rgb, od, cfg)
    if not np.isfinite(diameter_px):
        logger.info("no cell-like objects found; empty segmentation")
        return Segmentation(np.zeros((height, width), np.int32), float("nan"), True, 1.0)
    ws = _work_scale(diameter_px, height, width, cfg.work_diameter_px)
    od_work = _resize(od, ws)
    green, foreground, threshold, mark = _foreground(od, od_work, ws, cfg)
    unsplit = _watershed_cells(foreground, ws, cfg.min_marker_distance_frac)
    segments, disc_boxes = unsplit, {}
    if cfg.split_clumps:
        segments, disc_boxes = _split_clumps(unsplit, ws.cell_area, cfg.clump_area_frac)
    areas = np.bincount(segments.ravel(), minlength=int(segments.max()) + 1).astype(np.float64)
    keep = _size_filter(segments, areas, ws, cfg)
    if cfg.mark_max_frac is not None and mark.any():
        keep &= ~_under_mark(segments, areas, mark, ws, cfg.mark_max_frac)
    wbc, wbc_boxes, n_wbc_segments = None, [], 0
    if cfg.exclude_wbc and keep.any():
        wbc, wbc_boxes, n_wbc_segments = _white_cells(od_work, segments, unsplit, keep, areas, ws, cfg)
    if cfg.pale_cell_factor is not None:
        segments, keep = _pale_cells(green, foreground, threshold, cfg.pale_cell_factor, segments, keep,
                                     ws.cell_area, ws.diameter, blocked=wbc, mark=mark)
    n_excluded = int((~keep[1:]).sum()) - n_wbc_segments
    labels_work, boxes_work = _relabel(segments, keep, disc_boxes)
    if cfg.complete_boxes:
        boxes_work = _complete_boxes(labels_work, ws.diameter, boxes_work)
    labels, boxes = _to_full_resolution(labels_work, boxes_work, ws, height, width)
    logger.debug(
        "segment_field: %dx%d, diameter %.1f px (%s), %d cells, %d WBC, %d excluded, otsu %.3f",
        width, height, diameter_px, "estimated" if estimated else "given", int(keep.sum()), len(wbc_boxes),
        n_excluded, threshold,
    )
    return Segmentation(labels, diameter_px, estimated, float(ws.factor), wbc_boxes, max(0, n_excluded), boxes)


def _rbc_diameter(rgb: np.ndarray, od: np.ndarray, cfg: SegmentConfig) -> tuple[float, bool]:
    """``(typical RBC diameter px, estimated?)``: given in px, from the pixel size, or estimated
    (NaN when the field has no cell-like object); warns when it is implausible for the image."""
    if cfg.rbc_diameter_px is not None:
        diameter, estimated = float(cfg.rbc_diameter_px), False
    elif cfg.pixel_size_um is not None:
        diameter, estimated = float(cfg.rbc_diameter_um) / float(cfg.pixel_size_um), False
    else:
        diameter, estimated = estimate_rbc_diameter_px(rgb, od=od), True
        if not np.isfinite(diameter):
            return diameter, estimated
    h, w = rgb.shape[:2]
    if diameter < 6:
        warnings.warn(f"RBC diameter {diameter:.1f} px is very small; segmentation unreliable", stacklevel=3)
    if diameter > max(h, w):
        warnings.warn(f"RBC diameter {diameter:.1f} px exceeds the image size {w}x{h}", stacklevel=3)
    return diameter, estimated


def _work_scale(diameter_px: float, height: int, width: int, work_diameter_px: float) -> _WorkScale:
    """The resolution at which a cell is ``work_diameter_px`` across (at most 2x the original)."""
    factor = min(2.0, work_diameter_px / diameter_px)
    size = (max(8, round(width * factor)), max(8, round(height * factor)))
    diameter = diameter_px * factor
    radius = diameter / 2.0
    return _WorkScale(diameter_px, factor, size, size[0] / width, size[1] / height, diameter, radius,
                      np.pi * radius * radius)


def _resize(od: np.ndarray, ws: _WorkScale) -> np.ndarray:
    """``od`` at the working resolution (area interpolation when shrinking)."""
    import cv2

    return cv2.resize(od, ws.size, interpolation=cv2.INTER_AREA if ws.factor < 1 else cv2.INTER_LINEAR)


def _foreground(od: np.ndarray, od_work: np.ndarray, ws: _WorkScale, cfg: SegmentConfig):
    """Smoothed green OD, foreground mask, its threshold, and the burned-in mark mask (working resolution).

    Foreground: Otsu threshold of the smoothed green OD, central-pallor holes filled, specks
    removed, minus neutral black marks (scale bar, text: every channel absorbs, red OD > 1.5),
    then opened by a disc of ``d / 12`` to cut thin bridges between cells.
    """
    import cv2

    green = cv2.GaussianBlur(od_work[..., 1], (0, 0), max(0.5, ws.diameter / 30.0))
    foreground, threshold = _foreground_mask(
        green, min_object_px=max(4, int(0.5 * cfg.min_area_frac * ws.cell_area)),
        max_hole_px=cfg.max_hole_frac * ws.cell_area, factor=cfg.threshold_factor,
    )
    mark = cv2.resize(od[..., 0], ws.size, interpolation=cv2.INTER_NEAREST) > MARK_OD
    foreground &= ~mark
    opening = _disc(_bridge_radius(ws))
    foreground = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, opening).astype(bool)
    return green, foreground, threshold, mark


def _bridge_radius(ws: _WorkScale) -> int:
    """Radius (px, working resolution) of the opening that cuts bridges: a twelfth of a cell."""
    return max(1, int(round(ws.diameter / 12)))


def _watershed_cells(foreground: np.ndarray, ws: _WorkScale, min_marker_distance_frac: float) -> np.ndarray:
    """Marker-controlled watershed of the smoothed distance transform: ``(H, W)`` int32 segments."""
    import cv2
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    distance = cv2.distanceTransform(foreground.astype(np.uint8), cv2.DIST_L2, 5)
    smooth = cv2.GaussianBlur(distance, (0, 0), max(0.5, ws.diameter / 20.0))
    components, _ = ndi.label(foreground)
    peaks = _label_peaks(smooth, components, max(2, int(round(min_marker_distance_frac * ws.diameter))), 0.3 * ws.radius)
    markers = np.zeros(foreground.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-smooth, markers, mask=foreground).astype(np.int32)


def _label_peaks(image: np.ndarray, labels: np.ndarray, min_distance: int, threshold: float) -> np.ndarray:
    """The peaks of ``skimage.feature.peak_local_max(image, min_distance=min_distance,
    threshold_abs=threshold, labels=labels, exclude_border=False)``, same coordinates in the same
    order, at about a sixth of its CPU.

    scikit-image's per-label loop, without its overheads: in each label's box (the other pixels
    at the lowest float), a pixel of the label is a peak if it equals the maximum of its
    ``(2 min_distance + 1)``-square window (OpenCV's dilation with replicated borders, as SciPy's
    ``maximum_filter(mode="nearest")``: a maximum is exact) and exceeds ``threshold``; a label all
    of whose pixels are window maxima (flat) keeps its isolated pixels instead, as scikit-image
    does. A label's peaks, highest first (ties in raster order), are then thinned greedily: a peak
    closer than ``min_distance`` (Chebyshev) to one kept before it is dropped, the rule of
    ``skimage._shared.coord.ensure_spacing`` without its k-d tree. Equal to scikit-image's on
    real IML and Chula fields (``tests/smear/test_segment_speed.py``).

    Parameters
    ----------
    image : (H, W) ndarray of float32
    labels : (H, W) ndarray of int
        0 = background; each label's peaks are found within it.
    min_distance : int
        >= 1.
    threshold : float
        Peaks must exceed it.

    Returns
    -------
    (K, 2) ndarray of int64
        ``(row, col)`` of the peaks, label by label (ascending), highest first within a label.
    """
    import cv2
    from scipy import ndimage as ndi

    bg = np.finfo(image.dtype).min if np.issubdtype(image.dtype, np.floating) else np.iinfo(image.dtype).min
    kernel = np.ones((2 * min_distance + 1,) * 2, np.uint8)
    found = []
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        own = labels[sl] == i
        img = image[sl].copy()
        img[~own] = bg
        if img.size == 1:
            peak = img > threshold
        else:
            peak = img == cv2.dilate(img, kernel, borderType=cv2.BORDER_REPLICATE)
            if peak[own].all():  # flat: scikit-image keeps the pixels an opening removes
                peak = own ^ ndi.binary_opening(own)
            peak &= img > threshold
        rows, cols = np.nonzero(peak)
        if not len(rows):
            continue
        order = np.argsort(-img[rows, cols], kind="stable")
        rows, cols = rows[order], cols[order]
        if min_distance > 1 and len(rows) > 1:
            kept = [0]
            for k in range(1, len(rows)):
                kr, kc = rows[kept], cols[kept]
                if (np.maximum(np.abs(kr - rows[k]), np.abs(kc - cols[k])) >= min_distance).all():
                    kept.append(k)
            rows, cols = rows[kept], cols[kept]
        found.append(np.stack([rows + sl[0].start, cols + sl[1].start], axis=1))
    return np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), np.int64)


def _size_filter(segments: np.ndarray, areas: np.ndarray, ws: _WorkScale, cfg: SegmentConfig) -> np.ndarray:
    """``(n + 1,)`` bool: segments of a cell's size (a larger minimum for those cut by the border)."""
    from scipy import ndimage as ndi

    n = len(areas) - 1
    keep = np.ones(n + 1, bool)
    keep[0] = False
    border = np.zeros(n + 1, bool)
    for i, sl in enumerate(ndi.find_objects(segments), start=1):
        if sl is None:
            keep[i] = False
            continue
        border[i] = (sl[0].start == 0 or sl[1].start == 0 or sl[0].stop >= segments.shape[0]
                     or sl[1].stop >= segments.shape[1])
    min_area = cfg.min_area_frac * ws.cell_area
    too_small = areas < np.where(border, max(min_area, cfg.border_min_area_frac * ws.cell_area), min_area)
    too_big = areas > cfg.max_area_frac * ws.cell_area
    keep &= ~too_small & ~too_big
    return keep


def _under_mark(segments: np.ndarray, areas: np.ndarray, mark: np.ndarray, ws: _WorkScale,
                max_frac: float) -> np.ndarray:
    """``(n + 1,)`` bool: segments with more than ``max_frac`` of their area near a burned-in mark."""
    near = _dilate(mark, _bridge_radius(ws))
    return np.bincount(segments[near].ravel(), minlength=len(areas)) > max_frac * np.maximum(areas, 1)


def _white_cells(od_work: np.ndarray, segments: np.ndarray, unsplit: np.ndarray, keep: np.ndarray,
                 areas: np.ndarray, ws: _WorkScale, cfg: SegmentConfig):
    """Exclude white blood cells, in place in ``keep``: ``(WBC mask or None, WBC boxes px, segments excluded)``.

    Nucleus pixels absorb far more green light than the field's red cells (grey/pink stains) or
    more red light (deep-magenta stains, where red cells already absorb most green light), and
    more green than red (purple chromatin; neutral black marks absorb both equally). Nucleus
    blobs of at least ``wbc_nucleus_min_frac`` of a cell, dilated by 0.3 cell diameters to cover
    the cytoplasm, mark a WBC; segments with ≥ 20 % of their area on it, or whose unsplit
    segment has, are excluded.
    """
    import cv2
    from scipy import ndimage as ndi

    sigma = max(0.5, ws.diameter / 30.0)
    red = cv2.GaussianBlur(od_work[..., 0], (0, 0), sigma)
    green = cv2.GaussianBlur(od_work[..., 1], (0, 0), sigma)
    inside = keep[segments]
    ref_red = float(np.percentile(red[inside], 99)) if inside.any() else 0.5
    ref_green = float(np.median(green[inside])) if inside.any() else 0.5
    nucleus = ((green > ref_green + cfg.wbc_green_od_margin) | (red > ref_red + cfg.wbc_red_od_margin)) & (
        green > 1.25 * red
    )
    nucleus = cv2.morphologyEx(nucleus.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    blobs, n_blobs = ndi.label(nucleus)
    if not n_blobs:
        return None, [], 0
    large = np.bincount(blobs.ravel()) >= cfg.wbc_nucleus_min_frac * ws.cell_area
    large[0] = False
    if not large.any():
        return None, [], 0
    wbc = _dilate(large[blobs], max(1, int(round(0.3 * ws.diameter))))  # lobes of one WBC grouped
    n = len(areas) - 1
    hit = np.bincount(segments[wbc].ravel(), minlength=n + 1) >= 0.2 * np.maximum(areas, 1)
    # A split cell whose unsplit segment met the WBC goes with it (WBC cytoplasm merged with
    # red cells is not a clump of red cells).
    n_unsplit = int(unsplit.max())
    hit_unsplit = np.bincount(unsplit[wbc].ravel(), minlength=n_unsplit + 1) >= 0.2 * np.maximum(
        np.bincount(unsplit.ravel(), minlength=n_unsplit + 1), 1)
    parent = np.zeros(n + 1, np.int64)
    parent[segments.ravel()] = unsplit.ravel()
    hit |= hit_unsplit[parent]
    hit[0] = False
    n_excluded = int((hit & keep).sum())
    keep &= ~hit
    wbc_labels, _ = ndi.label(wbc)
    boxes = [
        (int(sl[1].start / ws.fx), int(sl[0].start / ws.fy), int(round((sl[1].stop - sl[1].start) / ws.fx)),
         int(round((sl[0].stop - sl[0].start) / ws.fy)))
        for sl in ndi.find_objects(wbc_labels) if sl is not None
    ]
    return wbc, boxes, n_excluded


def _relabel(segments: np.ndarray, keep: np.ndarray, disc_boxes: dict[int, tuple[int, int, int, int]]):
    """Kept segments renumbered 1..N (int32), and their disc boxes under the new numbers."""
    relabel = np.zeros(len(keep), np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[segments], {int(relabel[i]): b for i, b in disc_boxes.items() if keep[i]}


def _to_full_resolution(labels: np.ndarray, boxes: dict[int, tuple[int, int, int, int]], ws: _WorkScale,
                        height: int, width: int):
    """Labels (nearest neighbour, within the linearly resized foreground) and boxes at full resolution."""
    import cv2

    if labels.shape != (height, width):
        full = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
        inside = cv2.resize((labels > 0).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
        full = np.where(inside, full, 0).astype(np.int32)
    else:
        full = labels
    full_boxes = {}
    for i, (bx, by, bw, bh) in boxes.items():
        x0, y0 = max(0, int(bx / ws.fx)), max(0, int(by / ws.fy))
        x1, y1 = min(width, int(np.ceil((bx + bw) / ws.fx))), min(height, int(np.ceil((by + bh) / ws.fy)))
        full_boxes[i] = (x0, y0, x1 - x0, y1 - y0)
    return full, full_boxes


def _disc_centres(
    mask: np.ndarray, r: float, *, min_gain_frac: float, outside_weight: float, max_cells: int, min_depth_frac: float
) -> list[tuple[int, int]]:
    """Greedy cover of one segment by discs of radius ``r``: centres ``(row, col)`` in ``mask`` coordinates.

    Each step places the disc whose gain (newly covered segment pixels minus
    ``outside_weight`` x disc pixels on background) is largest, among centres at least
    ``min_depth_frac * r`` inside the segment; it stops when the best gain falls below
    ``min_gain_frac`` of a disc's area or after ``max_cells`` discs.
    """
    import cv2

    pad = int(np.ceil(r)) + 1
    m = np.pad(mask, pad).astype(np.float32)
    rr = int(np.ceil(r))
    yy, xx = np.mgrid[-rr : rr + 1, -rr : rr + 1]
    disk = ((yy * yy + xx * xx) <= r * r).astype(np.float32)
    dt = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5)
    allowed = dt >= min_depth_frac * r
    outside = cv2.filter2D(1.0 - m, -1, disk, borderType=cv2.BORDER_CONSTANT)
    uncovered = m.copy()
    centres: list[tuple[int, int]] = []
    while len(centres) < max_cells:
        gain = cv2.filter2D(uncovered, -1, disk, borderType=cv2.BORDER_CONSTANT) - outside_weight * outside
        gain[~allowed] = -np.inf
        cy, cx = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[cy, cx] >= min_gain_frac * disk.sum():
            break
        centres.append((int(cy) - pad, int(cx) - pad))
        # Centres are >= r + 1 px from the padded edge, so the disc window lies inside.
        uncovered[cy - rr : cy + rr + 1, cx - rr : cx + rr + 1] *= 1.0 - disk
    return centres


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle through points (Kåsa 1976, algebraic fit): ``(cx, cy, r)`` px."""
    a = np.stack([2.0 * x, 2.0 * y, np.ones_like(x)], axis=1)
    (cx, cy, c), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
    return float(cx), float(cy), float(np.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _complete_boxes(
    labels: np.ndarray,
    diameter_px: float,
    boxes: dict[int, tuple[int, int, int, int]],
    *,
    min_shared_frac: float = 0.05,
    radius_range: tuple[float, float] = (0.35, 0.7),
    min_points: int = 12,
) -> dict[int, tuple[int, int, int, int]]:
    """Whole-cell boxes of cells that touch or overlap other cells.

    Where cells touch or overlap, the watershed (or the disc cover of
    :func:`_split_clumps`) gives each cell its share of the group, cut by a straight line;
    the cell itself extends under its neighbour. The part of a cell's outline that borders
    background is its real edge: a circle fitted to it (:func:`_fit_circle`) gives the whole
    cell, and its box becomes the union of the share's box and the circle's box (clipped to
    the image). Cells that share less than ``min_shared_frac`` of their outline with other
    cells, with fewer than ``min_points`` outline points on background (points on the image
    edge do not count), or whose circle radius is outside ``radius_range`` x the typical
    diameter keep their box (measurements: ``docs/experiments/segmentation-history.md``).

    Parameters
    ----------
    labels : np.ndarray
        ``(H, W)`` int32 label image (0 = background), any resolution.
    diameter_px : float
        Typical RBC diameter at the resolution of ``labels``, px.
    boxes : dict
        Label -> ``(x, y, w, h)`` box already known (split cells' disc boxes); the share's
        mask box is used for other labels.

    Returns
    -------
    dict
        Label -> ``(x, y, w, h)`` px box (at the resolution of ``labels``) for the cells in
        ``boxes`` and every completed cell.
    """
    from scipy import ndimage as ndi

    out = dict(boxes)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return out
    big = np.iinfo(np.int32).max
    lo = ndi.minimum_filter(np.where(labels > 0, labels, big), size=3, mode="nearest")
    hi = ndi.maximum_filter(labels, size=3, mode="nearest")
    on_bg = ndi.minimum_filter(labels, size=3, mode="nearest") == 0
    cell = labels > 0
    shared = cell & ((lo < labels) | (hi > labels))
    edge = cell & (shared | on_bg)
    lab_flat = labels.ravel()
    n_edge = np.bincount(lab_flat[edge.ravel()], minlength=n + 1)
    n_shared = np.bincount(lab_flat[shared.ravel()], minlength=n + 1)
    h, w = labels.shape
    outer = cell & on_bg & ~shared
    outer[:2, :] = outer[-2:, :] = False
    outer[:, :2] = outer[:, -2:] = False
    ys, xs = np.nonzero(outer)
    ls = labels[ys, xs]
    order = np.argsort(ls, kind="stable")
    ys, xs, ls = ys[order], xs[order], ls[order]
    starts = np.searchsorted(ls, np.arange(n + 2))
    objs = ndi.find_objects(labels)
    rlo, rhi = radius_range[0] * diameter_px, radius_range[1] * diameter_px
    for i in range(1, n + 1):
        sl = objs[i - 1]
        if sl is None or n_shared[i] < min_shared_frac * max(n_edge[i], 1):
            continue
        a, b = starts[i], starts[i + 1]
        if b - a < min_points:
            continue
        cx, cy, r = _fit_circle(xs[a:b].astype(np.float64), ys[a:b].astype(np.float64))
        if not rlo <= r <= rhi:
            continue
        bx, by, bw, bh = out.get(i, (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start))
        x0, y0 = max(0.0, min(bx, cx - r)), max(0.0, min(by, cy - r))
        x1, y1 = min(float(w), max(bx + bw, cx + r)), min(float(h), max(by + bh, cy + r))
        out[i] = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1 - np.floor(x0))), int(np.ceil(y1 - np.floor(y0))))
    return out


def _disc(radius_px: int) -> np.ndarray:
    """Elliptical (disc) structuring element ``(2r+1, 2r+1)`` uint8 for OpenCV morphology."""
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))


def _dilate(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """``(H, W)`` bool mask dilated by a disc of ``radius_px`` px; bool."""
    import cv2

    return cv2.dilate(mask.astype(np.uint8), _disc(radius_px)).astype(bool)


def _pale_cells(
    g: np.ndarray,
    fg: np.ndarray,
    thr: float,
    factor: float,
    seg: np.ndarray,
    keep: np.ndarray,
    cell_area: float,
    d: float,
    *,
    blocked: np.ndarray | None = None,
    mark: np.ndarray | None = None,
    min_area_frac: float = 0.6,
    max_area_frac: float = 3.0,
    min_solidity: float = 0.85,
    absorb_frac: float = 0.7,
    max_dark_frac: float = 0.5,
    bg_margin: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Add pale cells the foreground threshold missed.

    P. vivax-infected red cells are enlarged and pale (Schueffner's stippling on a pale
    cytoplasm), and in deep-magenta stains their green OD falls below Otsu's threshold, which
    lies halfway between the background and the dark uninfected cells: they were not
    segmented, or only their darker part was (a small segment). Here the region above a lower
    threshold, away from the cells already found, is opened (removing the blurred rims of
    those cells) and each cell-sized (``[min_area_frac, max_area_frac]`` typical cells),
    convex (solidity >= ``min_solidity``) component becomes a cell. The upper bound allows for
    the enlargement: a P. vivax-infected cell reaches 1.5-2x the diameter of an uninfected
    one (CDC DPDx, *Malaria*), i.e. 2.3-4 cell areas. Kept segments smaller than
    ``absorb_frac`` cell areas count as free space (the dark part of a pale cell) and are
    replaced by the pale cell that covers most of them. Components cut by the image border,
    or with more than ``max_dark_frac`` of their pixels above ``thr`` (not pale), are skipped;
    each new cell then grows back into the ring left around its neighbours, so that
    :func:`_complete_boxes` fits its real outline. The low threshold is
    ``max(0.08, factor * thr, bg_margin * P95(background))``, the background being the pixels a
    quarter cell away from ``fg``; where that comes within 10 % of ``thr`` (pale-stained fields
    with a tinted background) the step does nothing. Ours (malaria-screen); measurements in
    ``docs/experiments/segmentation-history.md``.

    Parameters
    ----------
    g : np.ndarray
        ``(H, W)`` float32 smoothed green OD at working resolution.
    fg : np.ndarray
        ``(H, W)`` bool foreground of the main threshold.
    thr : float
        The main foreground threshold (OD).
    factor : float
        The low threshold's fraction of ``thr`` (see above).
    seg : np.ndarray
        ``(H, W)`` int32 labels at working resolution; ``keep`` ``(n + 1,)`` bool marks kept ones.
    cell_area, d : float
        Area (px) and diameter (px) of a typical cell at working resolution.
    blocked, mark : np.ndarray, optional
        ``(H, W)`` bool regions never taken (white blood cells, burned-in marks).

    Returns
    -------
    seg, keep : np.ndarray
        Labels with new cells appended after ``seg.max()``, and the extended keep flags.
    """
    import cv2
    from scipy import ndimage as ndi

    # The low threshold must stand clear of the background's own variation (grainy or tinted
    # backgrounds of pale-stained fields): at least bg_margin x its 95th percentile, measured
    # over pixels a quarter cell away from the foreground.
    far = ~_dilate(fg, max(1, int(round(d / 4))))
    if far.mean() < 0.02:
        return seg, keep
    low_thr = max(0.08, factor * thr, bg_margin * float(np.percentile(g[far], 95)))
    if low_thr >= 0.9 * thr:
        return seg, keep
    n = int(seg.max())
    areas = np.bincount(seg.ravel(), minlength=n + 1)
    solid = areas >= absorb_frac * cell_area  # kept or not (border, too big): not free space
    solid[0] = False
    k = max(1, int(round(d / 12)))
    occupied = _dilate(solid[seg], k)
    cand = (g > low_thr) & ~occupied
    if blocked is not None:
        cand &= ~blocked
    if mark is not None and mark.any():
        cand &= ~_dilate(mark, max(1, int(round(d / 4))))
    cand = _fill_small_holes(cand, None)
    cand = cv2.morphologyEx(cand.astype(np.uint8), cv2.MORPH_OPEN, _disc(max(1, int(round(d / 6))))).astype(bool)
    lab, nc = ndi.label(cand)
    if nc == 0:
        return seg, keep
    csz = np.bincount(lab.ravel(), minlength=nc + 1)
    seg = seg.copy()
    keep = list(keep)
    nxt = n + 1
    for j, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        if sl[0].start == 0 or sl[1].start == 0 or sl[0].stop >= g.shape[0] or sl[1].stop >= g.shape[1]:
            continue  # cut by the border: strips of cut cells merge into cell-sized regions
        if not (min_area_frac * cell_area <= csz[j] <= max_area_frac * cell_area):
            continue
        m = lab[sl] == j
        if (g[sl][m] > thr).mean() > max_dark_frac or _solidity(m) < min_solidity:
            continue
        sub = seg[sl]
        # small kept segments mostly inside the new cell are its dark part: absorbed
        inside = np.bincount(sub[m].ravel(), minlength=nxt)
        for i in np.nonzero(inside)[0]:
            if i and i <= n and keep[i] and not solid[i] and inside[i] >= 0.5 * areas[i]:
                keep[i] = False
                sub[sub == i] = 0
        sub[m & ((sub == 0) | ~np.asarray(keep, bool)[sub])] = nxt
        # Grow into the gap left around the cells already found, so that the new cell touches
        # its neighbours and _complete_boxes fits its whole outline, not the gap.
        y0, x0 = max(0, sl[0].start - k - 1), max(0, sl[1].start - k - 1)
        y1, x1 = min(g.shape[0], sl[0].stop + k + 1), min(g.shape[1], sl[1].stop + k + 1)
        big_sub = seg[y0:y1, x0:x1]
        grown = _dilate(big_sub == nxt, k)
        big_sub[grown & (big_sub == 0) & (g[y0:y1, x0:x1] > low_thr)] = nxt
        keep.append(True)
        nxt += 1
    return seg, np.asarray(keep, bool)


def _solidity(mask: np.ndarray) -> float:
    """Contour area / convex hull area of a bool mask's largest outer contour (1 = convex)."""
    import cv2

    cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not cnts:
        return 1.0
    c = max(cnts, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(c))
    return float(cv2.contourArea(c)) / hull if hull > 0 else 1.0


def _split_clumps(
    seg: np.ndarray,
    cell_area: float,
    clump_area_frac: float,
    *,
    max_cells: int = 12,
    radius_frac: float = 1.0,
    min_gain_frac: float = 0.45,
    outside_weight: float = 1.0,
    min_depth_frac: float = 0.4,
    max_solidity: float = 0.95,
) -> tuple[np.ndarray, dict[int, tuple[int, int, int, int]]]:
    """Split segments of overlapping cells by a greedy cover with cell-sized discs.

    Red cells are near-circular discs of similar size, so a segment larger than
    ``clump_area_frac`` typical cells that the watershed left whole (cells overlapping so much
    that their distance-transform peaks merge) is covered greedily by discs of the typical cell
    radius (:func:`_disc_centres`). With two or more discs, each pixel goes to the nearest disc
    centre (the cell's share of the clump: its mask) and the cell's box is that of its disc
    within the segment, which includes the part its neighbour overlaps. A large single cell is
    left whole: no second disc gains enough, or the segment is convex (solidity = area / convex
    hull area ≥ ``max_solidity``; overlapping cells leave notches, an enlarged *P. vivax*-
    infected cell or gametocyte does not; two unit discs overlapping with centres 1.4 radii apart
    have solidity ~0.93; measurements in ``docs/experiments/segmentation-history.md``).

    Parameters
    ----------
    seg : np.ndarray
        ``(H, W)`` int32 label image at working resolution.
    cell_area : float
        Area of a typical cell, px at working resolution.
    clump_area_frac : float
        Segments above this many typical cell areas (and up to ``max_cells``) are tried.

    Returns
    -------
    seg : np.ndarray
        ``(H, W)`` int32 labels; split parts get new labels after ``seg.max()``.
    boxes : dict
        Label -> ``(x, y, w, h)`` px disc box (working resolution) of every split part.
    """
    from scipy import ndimage as ndi

    n = int(seg.max())
    if n == 0:
        return seg, {}
    r = float(np.sqrt(cell_area / np.pi)) * radius_frac
    areas = np.bincount(seg.ravel(), minlength=n + 1)
    big = [i for i in range(1, n + 1) if clump_area_frac * cell_area < areas[i] <= max_cells * cell_area]
    if not big:
        return seg, {}
    seg = seg.copy()
    objs = ndi.find_objects(seg)
    nxt = n + 1
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for i in big:
        sl = objs[i - 1]
        m = seg[sl] == i
        if _solidity(m) >= max_solidity:
            continue
        cs = _disc_centres(m, r, min_gain_frac=min_gain_frac, outside_weight=outside_weight,
                           max_cells=max_cells, min_depth_frac=min_depth_frac)
        if len(cs) < 2:
            continue
        ys, xs = np.nonzero(m)
        c = np.asarray(cs, np.float64)
        d2 = (ys[:, None] - c[None, :, 0]) ** 2 + (xs[:, None] - c[None, :, 1]) ** 2
        owner = np.argmin(d2, axis=1)
        sub = seg[sl]  # a view: writes go to seg
        for j in range(len(cs)):
            lab = i
            if j:
                lab, nxt = nxt, nxt + 1
                sub[ys[owner == j], xs[owner == j]] = lab
            ind = d2[:, j] <= r * r
            y0, x0 = int(ys[ind].min()), int(xs[ind].min())
            boxes[lab] = (x0 + sl[1].start, y0 + sl[0].start, int(xs[ind].max()) + 1 - x0, int(ys[ind].max()) + 1 - y0)
    return seg, boxes


def segment_cells(rgb: np.ndarray, config: SegmentConfig | None = None) -> np.ndarray:
    """Segment red blood cells; label image only (see :func:`segment_field`).

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    config : SegmentConfig, optional
        Settings; default ``SegmentConfig()``.

    Returns
    -------
    np.ndarray
        ``(H, W)`` int32 label image: 0 background/excluded, 1..N red blood cells.

    Raises
    ------
    ValueError
        If ``rgb`` is not ``(H, W, 3)``.
    """
    return segment_field(rgb, config).labels


def _moments(labels: np.ndarray, objs: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label ``0..n``: pixel count and the sums of the pixels' x and y, ``(n + 1,)`` each.

    Counted inside each object's box (``objs``: ``find_objects``) when the boxes together cover
    at most 4x the image (cells: about a quarter of a full-image pass), else over the whole image.
    The sums are of integers, exact in float64 whatever the order, so both ways give the same
    values (label 0 is left at 0 by the first).
    """
    h, w = labels.shape
    if sum((sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start) for sl in objs if sl is not None) > 4 * h * w:
        ys, xs = np.indices((h, w), sparse=True)
        flat = labels.ravel()
        return (np.bincount(flat, minlength=n + 1),
                np.bincount(flat, weights=np.broadcast_to(xs, (h, w)).ravel(), minlength=n + 1),
                np.bincount(flat, weights=np.broadcast_to(ys, (h, w)).ravel(), minlength=n + 1))
    areas = np.zeros(n + 1, np.int64)
    sum_x, sum_y = np.zeros(n + 1), np.zeros(n + 1)
    for i, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        rows, cols = m.sum(1), m.sum(0)
        areas[i] = int(rows.sum())
        sum_y[i] = int(rows @ np.arange(sl[0].start, sl[0].stop))
        sum_x[i] = int(cols @ np.arange(sl[1].start, sl[1].stop))
    return areas, sum_x, sum_y


def cell_properties(
    labels: np.ndarray, *, border_margin_px: int = 1, boxes: dict[int, tuple[int, int, int, int]] | None = None
) -> list[CellProps]:
    """Per-cell bounding box, area, centroid and border flag of a label image.

    Parameters
    ----------
    labels : np.ndarray
        ``(H, W)`` integer label image (0 = background).
    border_margin_px : int
        A cell whose mask comes within this many px of the image edge is flagged ``border``.
    boxes : dict, optional
        Label -> ``(x, y, w, h)`` px box that replaces the mask's bounding box (split cells,
        :attr:`Segmentation.boxes`).

    Returns
    -------
    list of CellProps
        One entry per present label, ordered by label id.

    Raises
    ------
    ValueError
        If ``labels`` is not 2-D.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {labels.shape}")
    h, w = labels.shape
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return []
    objs = ndi.find_objects(labels.astype(np.int32, copy=False))
    areas, sum_x, sum_y = _moments(labels, objs, n)
    out = []
    m = border_margin_px
    for i, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        border = y0 < m or x0 < m or y1 > h - m or x1 > w - m
        a = int(areas[i])
        box = boxes.get(i) if boxes else None
        out.append(
            CellProps(
                id=i,
                bbox=tuple(int(v) for v in box) if box is not None else (int(x0), int(y0), int(x1 - x0), int(y1 - y0)),
                area_px=a,
                centroid=(float(sum_x[i] / a), float(sum_y[i] / a)),
                border=bool(border),
            )
        )
    return out
