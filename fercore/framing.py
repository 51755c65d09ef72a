"""Where a face crop lies in a photo: FER2013's framing of a face, from a detector's keypoints or box.

The service (:mod:`app.faces`) cuts every face it classifies with these functions, and the
real-photo benchmark (``bench.realfaces``) measures their parameters, so the framing has one home
and one set of numbers. A :class:`FaceFrame` says how large the square around the face is (in units
of the distance between the eyes, and of the distance from their midpoint to the mouth) and where
the eyes sit in it; without keypoints, the detector's box grown by a margin stands in.

No detector and no model here: plain geometry on Pillow images, importable by training too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from PIL import Image

Box = tuple[int, int, int, int]  # x, y, width, height in pixels
Point = tuple[float, float]  # x, y in pixels

# The keypoints an aligned crop needs (the person's own right and left: in an unmirrored photo of
# someone facing the camera, the right eye is the one on the image's left).
FRAME_LANDMARKS = frozenset({"right_eye", "left_eye", "mouth"})

# Longest side of a face crop: the model sees a 48x48 resize, and a crop waiting for its forward pass
# (or explained: its heatmap has the crop's size) must not hold the pixels of a face filling a
# 40-megapixel photo (a 4000x4000 crop is 48 MB in RGB, its explanation ~1.6 GB to compute).
MAX_CROP_SIDE = 256


@dataclass(frozen=True)
class FaceFrame:
    """How a face is framed in its crop.

    Aligned (keypoints known): a square turned so the eyes are level, its side the larger of
    ``side_per_eyes`` times the distance between the eyes and ``side_per_eyes_mouth`` times the
    distance from their midpoint to the mouth (a 3/4 view shortens the first, a face seen from
    above or below the second), the eyes' midpoint centred horizontally and ``eyes_y`` of the side
    from the top. The defaults are the medians of the detector's keypoints on 426 FER2013 PublicTest
    faces (docs/faces.md): FER2013's own framing. Unaligned: the detector's box grown by ``margin``
    of its size on each side (BlazeFace's box runs from the brows to the chin; FER2013's faces show
    some forehead and cheek).
    """

    side_per_eyes: float = 2.76
    side_per_eyes_mouth: float = 2.61
    eyes_y: float = 0.39
    margin: float = 0.1

    def __post_init__(self) -> None:
        if not (self.side_per_eyes > 0 and self.side_per_eyes_mouth > 0 and 0 < self.eyes_y < 1 and self.margin >= 0):
            raise ValueError(f"not a usable face frame: {self}")

    def scaled(self, factor: float) -> FaceFrame:
        """The same framing with a square ``factor`` times as large (the eyes at the same height)."""
        return FaceFrame(self.side_per_eyes * factor, self.side_per_eyes_mouth * factor, self.eyes_y, self.margin)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FER2013_FRAME = FaceFrame()
# The framing the service crops with: FER2013's, its square 15% smaller (the eyes at the same
# height), and without alignment the detector's box as it is. Chosen on the real-photo development
# set (bench.realfaces: KDEF's development subjects, 490 photos): aligned, 0.724 against 0.684 with
# FER2013_FRAME, the best of a grid of 8 sizes and 5 eye heights, whose neighbours (0.80-0.92 of the
# side, eyes at 0.36-0.39) all read 0.70-0.72; unaligned, margin 0 reads 0.708, 0.1 0.682, 0.2 0.618
# (docs/realfaces.md).
SERVED_FRAME = replace(FER2013_FRAME.scaled(0.85), margin=0.0)


def aligned_frame(landmarks: dict[str, Point], frame: FaceFrame = SERVED_FRAME) -> tuple[int, tuple[float, ...]]:
    """The aligned crop's side and the affine map (Pillow's coefficients) from crop pixel (u, v) to
    image pixel (x, y): a rotation by the eyes' angle taking (side / 2, eyes_y * side) in the crop
    to the eyes' midpoint in the image."""
    (rx, ry), (lx, ly), (mx, my) = landmarks["right_eye"], landmarks["left_eye"], landmarks["mouth"]
    cx, cy = (rx + lx) / 2, (ry + ly) / 2  # the eyes' midpoint
    dx, dy = lx - rx, ly - ry  # the person's right eye is on the image's left in an upright face
    eyes = math.hypot(dx, dy)
    side = max(1, round(max(frame.side_per_eyes * eyes, frame.side_per_eyes_mouth * math.hypot(mx - cx, my - cy))))
    cos, sin = (dx / eyes, dy / eyes) if eyes > 0 else (1.0, 0.0)
    u0, v0 = side / 2, frame.eyes_y * side
    return side, (cos, -sin, cx - cos * u0 + sin * v0, sin, cos, cy - sin * u0 - cos * v0)


def aligned_crop(
    image: Image.Image, landmarks: dict[str, Point], frame: FaceFrame = SERVED_FRAME, max_side: int = MAX_CROP_SIDE
) -> Image.Image:
    """The square around a face, rotated so its eyes are level, framed from its ``landmarks``
    (``right_eye``, ``left_eye``, ``mouth``, image pixels) as ``frame`` says; at the image's own
    resolution up to ``max_side`` pixels a side (the model's preprocessing resizes it). Where the
    square reaches outside the image (a face at the border) it is black."""
    side, (a, b, c, d, e, f) = aligned_frame(landmarks, frame)
    out = min(side, max_side)
    s = side / out  # an output pixel spans s crop pixels
    return image.transform((out, out), Image.Transform.AFFINE, (a * s, b * s, c, d * s, e * s, f), Image.Resampling.BILINEAR)


def box_crop(image: Image.Image, box: Box, frame: FaceFrame = SERVED_FRAME, max_side: int = MAX_CROP_SIDE) -> Image.Image:
    """``box`` grown by ``frame.margin`` and clipped to the image, cut out and shrunk to at most
    ``max_side`` a side."""
    x, y, w, h = expand_box(box, frame.margin, *image.size)
    return shrunk(image.crop((x, y, x + w, y + h)), max_side)


def face_crop(
    image: Image.Image, box: Box, landmarks: dict[str, Point], align: bool = True, frame: FaceFrame = SERVED_FRAME
) -> Image.Image:
    """The crop the model classifies: :func:`aligned_crop` when ``align`` and the keypoints are
    known, else :func:`box_crop`."""
    if align and landmarks.keys() >= FRAME_LANDMARKS:
        return aligned_crop(image, landmarks, frame)
    return box_crop(image, box, frame)


def face_region(
    box: Box, landmarks: dict[str, Point], size: tuple[int, int], align: bool = True, frame: FaceFrame = SERVED_FRAME
) -> Box:
    """Where :func:`face_crop`'s crop lies in an image of ``size``: the box grown by the margin, or,
    for an aligned crop, the upright square of its side around its centre (the crop itself is that
    square turned by the eyes' angle; it may reach outside the image)."""
    if not (align and landmarks.keys() >= FRAME_LANDMARKS):
        return expand_box(box, frame.margin, *size)
    side, (a, b, c, d, e, f) = aligned_frame(landmarks, frame)
    x, y = a * side / 2 + b * side / 2 + c, d * side / 2 + e * side / 2 + f  # the crop's centre in the image
    return round(x - side / 2), round(y - side / 2), side, side


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


def shrunk(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` reduced by a whole factor (box average) so its longer side is at most ``max_side``."""
    factor = -(-max(image.size) // max_side)  # ceil
    return image.reduce(factor) if factor > 1 else image
