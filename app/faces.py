"""Face detection: where the faces are in an upright image, and the crops the model classifies.

The detector is OpenCV's frontal-face Haar cascade, the XML file that ships inside
``opencv-python-headless`` (nothing is downloaded at run time). It is fast on a CPU and finds
upright faces looking roughly at the camera; it misses profiles and strongly tilted heads.
It is loaded once, in the app's lifespan (:mod:`app.main`), never per request.

A ``CascadeClassifier`` must not be used by two threads at once (``detectMultiScale`` sets the
image on the classifier's shared feature evaluator), so :class:`FaceDetector` holds a pool of
them, one per inference allowed to run at the same time.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from cv2.data import haarcascades
from PIL import Image

CASCADE_PATH = Path(haarcascades) / "haarcascade_frontalface_default.xml"

# Detection runs on a copy whose longer side is at most this many pixels, and the boxes are
# scaled back: the cascade's time grows with the pixel count, and a face big enough to read an
# expression from is still far above the cascade's 24-px window at this size.
DETECT_MAX_SIDE = 1024
# Step between the image-pyramid levels: 1.1 finds more faces than 1.2-1.3, at about twice the time.
SCALE_FACTOR = 1.1
# Overlapping raw hits a face needs to be reported: fewer finds more faces, and more false ones.
MIN_NEIGHBORS = 5
# Smallest face reported, as a fraction of the image's shorter side: smaller hits in a photo
# are mostly texture (fabric, foliage), and too few pixels to read an expression from anyway...
MIN_FACE_FRACTION = 0.05
# ...and never below the model's 48x48 input: a smaller face would be classified from upscaled
# pixels, and the pyramid levels that find such faces are the most expensive ones (the image is
# scanned at nearly full size), ~3x the detection time of a 48 px floor on a 512 px photo.
MIN_FACE_PX = 48
# Margin added around a detected box before cropping, per side, as a fraction of the box: the
# cascade's box runs from the brows to the chin; FER2013's faces show some forehead and cheek.
CROP_MARGIN = 0.1

Box = tuple[int, int, int, int]  # x, y, width, height in pixels


class FaceDetectorError(RuntimeError):
    """The cascade file is missing or unreadable: a broken install, not a client's fault."""


class FaceDetector:
    """Finds upright frontal faces. Safe for ``pool_size`` concurrent calls; more wait for a free one."""

    def __init__(self, cascade_path: Path = CASCADE_PATH, pool_size: int = 1) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.cascade_path = cascade_path
        self._pool: queue.SimpleQueue[cv2.CascadeClassifier] = queue.SimpleQueue()
        for _ in range(pool_size):
            self._pool.put(load_cascade(cascade_path))

    def detect(self, image: Image.Image) -> list[Box]:
        """The faces in ``image``, in its pixel coordinates, left to right (then top to bottom)."""
        gray = np.asarray(image.convert("L"))  # uint8 (H, W)
        small, scale = downscale(gray, DETECT_MAX_SIDE)
        min_side = min_face_side(small.shape)
        if min(small.shape) < min_side:
            return []
        cascade = self._pool.get()
        try:
            found = cascade.detectMultiScale(
                cv2.equalizeHist(small),  # evens out dark or washed-out photos
                scaleFactor=SCALE_FACTOR,
                minNeighbors=MIN_NEIGHBORS,
                minSize=(min_side, min_side),
            )
        finally:
            self._pool.put(cascade)
        width, height = image.size
        return sorted(to_image_box([int(v) for v in box], scale, width, height) for box in found)


def load_cascade(path: Path) -> cv2.CascadeClassifier:
    """A cascade classifier read from ``path``, or :class:`FaceDetectorError` saying why not."""
    if not path.is_file():
        raise FaceDetectorError(f"{path}: face detector cascade not found")
    try:
        cascade = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError) as exc:  # malformed XML raises; unknown content loads empty
        raise FaceDetectorError(f"{path}: face detector cascade could not be read ({exc})") from None
    if cascade.empty():
        raise FaceDetectorError(f"{path}: face detector cascade could not be read")
    return cascade


def configure_opencv(threads: int) -> None:
    """Cap OpenCV's own worker threads (process-wide), as ``torch.set_num_threads`` does for torch."""
    cv2.setNumThreads(threads)


def downscale(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``gray`` shrunk so its longer side is at most ``max_side``, and the factor applied (<= 1)."""
    height, width = gray.shape
    longer = max(height, width)
    if longer <= max_side:
        return gray, 1.0
    scale = max_side / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA), scale  # area: no aliasing


def min_face_side(shape: tuple[int, ...]) -> int:
    """Smallest face side worth reporting in an image of ``shape`` (H, W), in pixels."""
    return max(MIN_FACE_PX, round(MIN_FACE_FRACTION * min(shape[:2])))


def to_image_box(box: Sequence[int], scale: float, width: int, height: int) -> Box:
    """A box found on an image downscaled by ``scale``, in the full image's pixels, inside it."""
    x, y, w, h = (round(v / scale) for v in box)
    return clamp_box(x, y, w, h, width, height)


def expand_box(box: Box, margin: float, width: int, height: int) -> Box:
    """``box`` grown by ``margin`` of its width/height on each side, clipped to the image."""
    x, y, w, h = box
    dx, dy = round(w * margin), round(h * margin)
    return clamp_box(x - dx, y - dy, w + 2 * dx, h + 2 * dy, width, height)


def clamp_box(x: int, y: int, w: int, h: int, width: int, height: int) -> Box:
    """The part of the box inside a ``width`` x ``height`` image (at least one pixel)."""
    left, top = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
    right, bottom = min(max(x + w, left + 1), width), min(max(y + h, top + 1), height)
    return left, top, right - left, bottom - top


def crop_faces(image: Image.Image, boxes: Sequence[Box], margin: float = CROP_MARGIN) -> list[Image.Image]:
    """One crop per box, each grown by ``margin`` and clipped to the image."""
    width, height = image.size
    crops = []
    for box in boxes:
        x, y, w, h = expand_box(box, margin, width, height)
        crops.append(image.crop((x, y, x + w, y + h)))
    return crops


def whole_image_crop(image: Image.Image, max_side: int = DETECT_MAX_SIDE) -> Image.Image:
    """``image`` as the one face crop of ``detect=false``: shrunk by a whole factor (box average) so
    its longer side is at most ``max_side``.

    The model sees a 48x48 resize of it either way; shrunk now, a crop that waits for its forward
    pass (beside a batch's other files, or in a micro-batch) holds at most ``max_side`` squared
    pixels, not the full image: at MAX_IMAGE_PIXELS (40 Mpx) that is 160 MB in RGB, and sixteen of
    them in one ``/predict/batch`` would exceed the instance's memory.
    """
    factor = -(-max(image.size) // max_side)  # ceil
    return image.reduce(factor) if factor > 1 else image
