"""Face detection: where the faces are in an upright image, their landmarks, and the crops the model classifies.

The detector is MediaPipe's BlazeFace *full-range* model (Apache-2.0), converted once to ONNX and
committed in ``app/assets`` (provenance there; nothing is downloaded at run time), run by ONNX
Runtime like the classifier. It finds faces turned or tilted well away from the camera (3/4
views, heads rolled ~45 degrees), in colour or grey photos, and returns six keypoints per face.
It is loaded once, in the app's lifespan (:mod:`app.main`); an ``InferenceSession`` is safe for
concurrent ``run`` calls, so one detector serves every inference slot.

Steps (docs/faces.md): the image is letterboxed into the model's 192x192 input (a wide one also
in squares along it: :func:`windows`); the model scores 2304 anchors (a 48x48 grid) and regresses
a box and six keypoints for each; :func:`decode` turns those into boxes in the image's pixels,
:func:`weighted_nms` merges the overlapping ones (as MediaPipe's graph does), and faces under
:data:`MIN_FACE_PX` are dropped. :func:`crop_faces` cuts each face out, turned
so its eyes are level (:func:`aligned_crop`) when alignment is on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from fercore.framing import (
    MAX_CROP_SIDE,
    SERVED_FRAME,
    Box,
    FaceFrame,
    Point,
    clamp_box,
    face_crop,
    face_region,
    shrunk,
)

__all__ = ["MAX_CROP_SIDE", "Box", "Detection", "DetectorConfig", "FaceDetector", "FaceFrame", "Point", "crop_faces"]

MODEL_PATH = Path(__file__).resolve().parent / "assets" / "face_detection_full_range.onnx"

# The model's input side, and its anchors: MediaPipe's face_detection_full_range_common.pbtxt
# (SsdAnchorsCalculator: one layer, stride 4, anchor offset 0.5, fixed anchor size) gives one anchor
# at the centre of each cell of a 48x48 grid; the regressors are in input pixels (x/y/w/h scale 192).
INPUT_SIDE = 192
ANCHOR_STRIDE = 4
# Raw scores are clipped before the sigmoid, as MediaPipe does (score_clipping_thresh).
SCORE_CLIP = 100.0
# The six keypoints, in the model's order. "right" and "left" are the person's own: in an unmirrored
# photo of someone facing the camera, the right eye is the one on the image's left.
LANDMARKS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")

# Smallest face reported, in pixels of the image detection works at (the image reduced to at most
# the detector's max_side): a smaller face would be classified from upscaled pixels, below the
# model's 48x48 input.
MIN_FACE_PX = 48
# Images with a longer side over this many times their shorter side are also looked at in squares
# (:func:`windows`): above it, letterboxing shrinks their faces the most...
WIDE_ASPECT = 1.5
# ...and images whose shorter side is this long or longer (at the detector's max_side) in a grid of
# squares: a 48-px face (the smallest reported) is under 12 px in the model's input when it sees
# them whole, and is missed; in a square of half the side it is twice that.
GRID_MIN_SIDE = 768
# The grid's squares, as a fraction of the shorter side: 1/2 makes a 4:3 photo 4x3 squares (13 runs
# in all) and shows a 48-px face at 24 px; 2/3 (7 runs) missed one face of a 3x3 crowd of 105-px faces.
GRID_SIDE = 1 / 2
# Default longer side detection works at; larger images are reduced first (JPEGs while decoding).
DETECT_MAX_SIDE = 1024


@dataclass(frozen=True)
class Detection:
    """One face: its box (image pixels, inside the image), the model's score, and named keypoints
    (image pixels, floats; a face cut by the border may have some just outside the image)."""

    box: Box
    score: float
    landmarks: dict[str, Point] = field(default_factory=dict)

    def scaled(self, factor: float) -> Detection:
        """This detection in the pixels of a copy of the image ``factor`` times as large."""
        if factor == 1.0:
            return self
        box: Box = tuple(round(v * factor) for v in self.box)  # type: ignore[assignment]
        points = {name: (x * factor, y * factor) for name, (x, y) in self.landmarks.items()}
        return Detection(box, self.score, points)


class FaceDetectorError(RuntimeError):
    """The model file is missing or unreadable: a broken install, not a client's fault."""


@dataclass(frozen=True)
class DetectorConfig:
    """How detections are found, filtered and cropped (from the settings: FACE_SCORE_THRESHOLD,
    FACE_NMS_IOU, FACE_DETECT_MAX_SIDE, FACE_ALIGN, FACE_DETECT_GRID)."""

    score_threshold: float = 0.5
    nms_iou: float = 0.3
    max_side: int = DETECT_MAX_SIDE
    align: bool = True
    grid: bool = True


class FaceDetector:
    """Finds faces with BlazeFace full-range on ONNX Runtime. Safe for concurrent calls."""

    def __init__(self, config: DetectorConfig | None = None, model_path: Path = MODEL_PATH, threads: int = 1) -> None:
        self.config = config or DetectorConfig()
        self.model_path = model_path
        self._session = load_session(model_path, threads)
        self._input = self._session.get_inputs()[0].name
        self._anchors = anchor_centres()

    @property
    def max_side(self) -> int:
        return self.config.max_side

    @property
    def align(self) -> bool:
        return self.config.align

    def detect(self, image: Image.Image) -> list[Detection]:
        """The faces in ``image``, in its pixel coordinates, left to right (then top to bottom)."""
        # A large image (a PNG, TIFF... that the decoder could not reduce) is looked at through a copy
        # reduced by a whole factor (box average, fast) to at least max_side: each window's crop and
        # resize would otherwise touch every one of its pixels, up to MAX_IMAGE_PIXELS of them.
        factor = max(1, max(image.size) // self.config.max_side)
        small = image.reduce(factor) if factor > 1 else image
        found = [self._run(small, window) for window in windows(small.size, self.config.max_side, self.config.grid)]
        rows, scores = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
        if not len(scores):
            rows, scores = self._run_zoomed_out(small)
        rows *= np.tile(np.array(image.size, dtype=np.float32) / np.array(small.size, dtype=np.float32), 8)
        merged = weighted_nms(rows, scores, self.config.nms_iou)
        min_side = MIN_FACE_PX * max(1.0, max(image.size) / self.config.max_side)
        detections = [to_detection(row, score, image.size) for row, score in merged if face_side(row) >= min_side]
        return sorted(detections, key=lambda d: (d.box[0], d.box[1]))

    def _run_zoomed_out(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """The model on ``image`` in the middle of a black canvas twice its size, rows in ``image``'s
        pixels. A face that fills the photo (a cropped selfie, a face-only data set: 3,056 of RAF-DB's
        3,067 test faces, 100x100 crops) is larger than any of the model's anchors expect and goes
        unseen; shown at half the size most are found (235 missed). Run only when nothing else was."""
        width, height = image.size
        canvas = Image.new(image.mode, (2 * width, 2 * height))
        canvas.paste(image, (width // 2, height // 2))
        rows, scores = self._run(canvas, (0, 0, *canvas.size))
        return rows - np.tile(np.array([width // 2, height // 2], dtype=np.float32), 8), scores

    def _run(self, image: Image.Image, window: Box) -> tuple[np.ndarray, np.ndarray]:
        """The model on one ``window`` of ``image``: the rows (box, keypoints; image pixels) and scores
        of the anchors scoring at least the threshold, before suppression."""
        x0, y0, w, h = window
        part = image if (w, h) == image.size else image.crop((x0, y0, x0 + w, y0 + h))
        x, scale, pad = letterbox(part)
        regressors, logits = self._session.run(None, {self._input: x})
        boxes, scores = decode(regressors[0], logits[0, :, 0], self._anchors)
        keep = scores >= self.config.score_threshold
        # Letterbox units (0-1 of the 192 input) -> pixels of the window -> pixels of the image.
        offset = np.tile(pad, 8) / scale - np.tile(np.array([x0, y0], dtype=np.float32), 8)
        rows, scores = boxes[keep] * (INPUT_SIDE / scale) - offset, scores[keep]
        if (w, h) != image.size:
            # A face cut by a square's inner edge is half a face there; the next square or the whole
            # image sees all of it. Kept, it could survive suppression beside the whole one.
            inner = inside_window(rows, window, image.size)
            rows, scores = rows[inner], scores[inner]
        return rows, scores


def windows(size: tuple[int, int], max_side: int = DETECT_MAX_SIDE, grid: bool = True) -> list[Box]:
    """Where the model looks: the whole image, and squares of it overlapping by a quarter or more.

    The model sees everything at 192 px and finds faces down to about a tenth of that. Letterboxed
    whole, a wide group photo leaves its faces a few pixels tall (a 1600x600 photo's faces of
    150 px become 18 px), and so does a large photo of a crowd. So an image more than WIDE_ASPECT
    times as wide as tall (or tall as wide) is also looked at in squares of its shorter side along
    it; and an image whose shorter side, reduced to ``max_side``, is GRID_MIN_SIDE or more, in
    unless ``grid`` is off, a grid of squares of GRID_SIDE of its shorter side. One run per window:
    a 4:3 photo under 1024x768 (at ``max_side``) is one run, larger ones 13.
    """
    width, height = size
    short, long = min(size), max(size)
    if grid and short * min(1.0, max_side / long) >= GRID_MIN_SIDE:
        side = math.ceil(short * GRID_SIDE)
    elif long > WIDE_ASPECT * short and short >= INPUT_SIDE:
        side = short  # a narrower strip (a 10000x1 banner...) would be thousands of windows
    else:
        return [(0, 0, width, height)]
    squares = [(x, y, side, side) for y in starts(height, side) for x in starts(width, side)]
    return [(0, 0, width, height), *squares]


def starts(length: int, side: int) -> list[int]:
    """Where windows of ``side`` start along ``length``: from one end to the other, overlapping by a
    quarter of ``side`` or more."""
    if length <= side:
        return [0]
    count = math.ceil((length - side) / (0.75 * side)) + 1
    step = (length - side) / (count - 1)
    return [round(i * step) for i in range(count)]


def inside_window(rows: np.ndarray, window: Box, size: tuple[int, int]) -> np.ndarray:
    """Which ``rows`` (image pixels) have their box inside ``window``, except across its edges that
    are the image's own (a face cut by the photo's border is still a face)."""
    x0, y0, w, h = window
    left = (rows[:, 0] >= x0) | (x0 == 0)
    top = (rows[:, 1] >= y0) | (y0 == 0)
    right = (rows[:, 2] <= x0 + w) | (x0 + w >= size[0])
    bottom = (rows[:, 3] <= y0 + h) | (y0 + h >= size[1])
    return left & top & right & bottom


def load_session(path: Path, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session for the model at ``path``, or :class:`FaceDetectorError` saying why not."""
    if not path.is_file():
        raise FaceDetectorError(f"{path}: face detector model not found")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf... for a bad file
        raise FaceDetectorError(f"{path}: face detector model could not be read ({exc})") from None
    shapes = [tuple(o.shape) for o in session.get_outputs()]
    if shapes != [(1, 2304, 16), (1, 2304, 1)]:
        raise FaceDetectorError(f"{path}: not the BlazeFace full-range model (outputs {shapes})")
    return session


def anchor_centres() -> np.ndarray:
    """The anchors' centres, float32 (2304, 2), x then y in 0-1 of the input, row by row."""
    cells = INPUT_SIDE // ANCHOR_STRIDE
    centres = (np.arange(cells, dtype=np.float32) + 0.5) / cells
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def letterbox(image: Image.Image) -> tuple[np.ndarray, float, np.ndarray]:
    """``image`` as the model's input: scaled to fit 192x192, centred on black, RGB in [-1, 1].

    Returns the input, float32 (1, 3, 192, 192); the scale applied; and the padding (x, y) in
    input pixels, which :meth:`FaceDetector.detect` takes off again.
    """
    width, height = image.size
    scale = INPUT_SIDE / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: a quick box reduction first, then the antialiased resize on the smaller copy.
    small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    pad = np.array([(INPUT_SIDE - size[0]) // 2, (INPUT_SIDE - size[1]) // 2], dtype=np.float32)
    canvas = np.zeros((INPUT_SIDE, INPUT_SIDE, 3), dtype=np.uint8)
    canvas[int(pad[1]) : int(pad[1]) + size[1], int(pad[0]) : int(pad[0]) + size[0]] = np.asarray(small)
    x = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0
    return x, scale, pad


def decode(regressors: np.ndarray, logits: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and keypoints of every anchor, and its score (MediaPipe's TensorsToDetectionsCalculator).

    ``regressors``: (N, 16): box centre offset x, y, width, height, then six keypoint offsets (x, y),
    in input pixels. Returns (N, 16) rows of xmin, ymin, xmax, ymax, then the keypoints, in 0-1 of
    the input; and (N,) scores in 0-1.
    """
    values = regressors.reshape(-1, 8, 2) / INPUT_SIDE
    centre, half = values[:, 0] + anchors, values[:, 1] / 2
    points = values[:, 2:] + anchors[:, None, :]
    boxes = np.concatenate([centre - half, centre + half, points.reshape(-1, 12)], axis=1)
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -SCORE_CLIP, SCORE_CLIP)))  # float32 overflows
    return boxes, scores


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one (xmin, ymin, xmax, ymax) box with each of ``others`` (M, 4)."""
    lo = np.maximum(box[:2], others[:, :2])
    hi = np.minimum(box[2:4], others[:, 2:4])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:4] - box[:2])
    areas = np.prod(others[:, 2:4] - others[:, :2], axis=1)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(rows: np.ndarray, scores: np.ndarray, threshold: float) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's weighted non-maximum suppression: the best-scoring detection absorbs every other
    whose box overlaps it by more than ``threshold`` IoU; its box and keypoints become their
    score-weighted mean (steadier than the best one alone), its score stays the best one's."""
    order = np.argsort(-scores, kind="stable")
    rows, scores = rows[order], scores[order]
    merged = []
    while len(rows):
        overlapping = iou(rows[0, :4], rows[:, :4]) > threshold
        overlapping[0] = True
        weights = scores[overlapping]
        merged.append(((rows[overlapping] * weights[:, None]).sum(axis=0) / weights.sum(), float(scores[0])))
        rows, scores = rows[~overlapping], scores[~overlapping]
    return merged


def face_side(row: np.ndarray) -> float:
    """The shorter side of a detection's box (image pixels, before clipping to the image)."""
    return float(min(row[2] - row[0], row[3] - row[1]))


def to_detection(row: np.ndarray, score: float, size: tuple[int, int]) -> Detection:
    """A :class:`Detection` from a merged row in image pixels, its box clipped to the image."""
    x0, y0, x1, y1 = (round(float(v)) for v in row[:4])
    box = clamp_box(x0, y0, x1 - x0, y1 - y0, *size)
    points = row[4:].reshape(-1, 2)
    return Detection(box, score, {name: (float(x), float(y)) for name, (x, y) in zip(LANDMARKS, points, strict=True)})


def crop_faces(
    image: Image.Image, detections: Sequence[Detection], align: bool = True, frame: FaceFrame = SERVED_FRAME
) -> list[Image.Image]:
    """One crop per detection, as :func:`fercore.framing.face_crop` frames it: turned so the eyes are
    level and framed as FER2013's faces are when ``align`` and the keypoints are known; else the box
    grown by the frame's margin and clipped to the image. At most :data:`MAX_CROP_SIDE` pixels a side."""
    return [face_crop(image, d.box, d.landmarks, align, frame) for d in detections]


def crop_region(detection: Detection, size: tuple[int, int], align: bool = True, frame: FaceFrame = SERVED_FRAME) -> Box:
    """Where :func:`crop_faces`'s crop of ``detection`` lies in an image of ``size``
    (:func:`fercore.framing.face_region`)."""
    return face_region(detection.box, detection.landmarks, size, align, frame)


def whole_image_crop(image: Image.Image, max_side: int = DETECT_MAX_SIDE) -> Image.Image:
    """``image`` as the one face crop of ``detect=false``: shrunk by a whole factor (box average) so
    its longer side is at most ``max_side``.

    The model sees a 48x48 resize of it either way; shrunk now, a crop that waits for its forward
    pass (beside a batch's other files, or in a micro-batch) holds at most ``max_side`` squared
    pixels, not the full image: at MAX_IMAGE_PIXELS (40 Mpx) that is 160 MB in RGB, and sixteen of
    them in one ``/predict/batch`` would exceed the instance's memory.
    """
    return shrunk(image, max_side)
