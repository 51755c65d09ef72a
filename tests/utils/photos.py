"""Real photos for face detection: the public-domain ones scikit-image ships (``skimage.data``)."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

from PIL import Image
from skimage import data as skdata

# Eileen Collins' face in skimage's 512x512 astronaut photo runs, brows to chin, over about
# x 180-265, y 65-160 (located by eye). A detected box must lie in this region (the face
# plus some slack) and be face-sized: not the whole head and shoulders, not a feature.
ASTRONAUT_FACE_REGION = (160, 40, 290, 185)  # left, top, right, bottom


def photo(name: str) -> Image.Image:
    """``skimage.data.<name>()`` as a PIL image, e.g. ``astronaut``, ``coffee``, ``rocket``."""
    return Image.fromarray(getattr(skdata, name)())


@functools.cache
def photo_jpeg(name: str) -> bytes:
    """The photo as a camera would send it."""
    buf = io.BytesIO()
    photo(name).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def assert_astronaut_face(box: Sequence[int], scale: float = 1.0) -> None:
    """``box`` (x, y, w, h) is the astronaut's face, in a copy of the photo ``scale`` times as large."""
    x, y, w, h = (v / scale for v in box)
    left, top, right, bottom = ASTRONAUT_FACE_REGION
    assert left <= x and top <= y and x + w <= right and y + h <= bottom, box
    assert 60 <= w <= 130 and 60 <= h <= 130, box
