"""fercore.framing: how a face is framed in the crop the model classifies (serving's one home for it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from app.faces import Detection, crop_faces, crop_region
from fercore.framing import (
    FER2013_FRAME,
    SERVED_FRAME,
    FaceFrame,
    aligned_crop,
    box_crop,
    clamp_box,
    expand_box,
    face_crop,
    face_region,
)


def two_eyes_and_a_mouth(angle_deg: float = 30.0) -> tuple[Image.Image, dict[str, tuple[float, float]]]:
    """A black 400x400 image with two white dots for eyes 80 px apart on a line at ``angle_deg``,
    and the keypoints of a mouth 70 px below their midpoint (perpendicular to that line)."""
    image = Image.new("L", (400, 400), 0)
    a = math.radians(angle_deg)
    centre, half = np.array([200.0, 200.0]), 40 * np.array([math.cos(a), math.sin(a)])
    right, left = centre - half, centre + half
    for x, y in (right, left):
        image.paste(255, (round(x) - 2, round(y) - 2, round(x) + 3, round(y) + 3))
    mouth = centre + 70 * np.array([-math.sin(a), math.cos(a)])
    return image, {"right_eye": tuple(right), "left_eye": tuple(left), "mouth": tuple(mouth)}


@pytest.mark.parametrize("frame", [FER2013_FRAME, FaceFrame(3.2, 3.0, 0.45), FER2013_FRAME.scaled(0.9)])
def test_aligned_crop_levels_the_eyes_and_frames_them_as_the_frame_says(frame: FaceFrame) -> None:
    """In the crop the eyes are level, centred, ``eyes_y`` of the side from the top, and the side is
    the larger of the two keypoint distances times the frame's factors."""
    image, landmarks = two_eyes_and_a_mouth()
    crop = aligned_crop(image, landmarks, frame)
    side = round(max(frame.side_per_eyes * 80, frame.side_per_eyes_mouth * 70))
    assert crop.size == (side, side)
    ys, xs = np.nonzero(np.asarray(crop) > 128)
    assert ys.max() - ys.min() <= 6  # both dots on one row
    assert ys.mean() == pytest.approx(frame.eyes_y * side, abs=2)
    assert xs.mean() == pytest.approx(side / 2, abs=2)  # centred
    assert xs.max() - xs.min() == pytest.approx(80 + 4, abs=3)  # eye distance kept: no scaling


def test_the_fer2013_frame_is_the_medians_measured_on_publictest() -> None:
    """docs/faces.md's numbers: a change to them is a change to every served crop, so it is deliberate."""
    assert FaceFrame(side_per_eyes=2.76, side_per_eyes_mouth=2.61, eyes_y=0.39, margin=0.1) == FER2013_FRAME
    assert FER2013_FRAME.scaled(1.1).eyes_y == FER2013_FRAME.eyes_y
    assert FER2013_FRAME.scaled(1.1).side_per_eyes == pytest.approx(2.76 * 1.1)


def test_the_service_crops_tighter_than_fer2013s_medians_as_the_development_set_chose() -> None:
    """fercore.framing.SERVED_FRAME: the square 0.85 of FER2013's, the eyes as high, no box margin."""
    assert SERVED_FRAME.side_per_eyes == pytest.approx(0.85 * FER2013_FRAME.side_per_eyes)
    assert SERVED_FRAME.side_per_eyes_mouth == pytest.approx(0.85 * FER2013_FRAME.side_per_eyes_mouth)
    assert SERVED_FRAME.eyes_y == FER2013_FRAME.eyes_y and SERVED_FRAME.margin == 0.0
    image, landmarks = two_eyes_and_a_mouth()
    assert face_crop(image, (150, 150, 100, 100), landmarks).size == aligned_crop(image, landmarks, SERVED_FRAME).size


@pytest.mark.parametrize("bad", [{"side_per_eyes": 0}, {"eyes_y": 1.0}, {"eyes_y": 0}, {"margin": -0.1}])
def test_an_unusable_frame_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="not a usable face frame"):
        FaceFrame(**bad)


def test_the_service_crops_with_the_shared_framing() -> None:
    """app.faces.crop_faces and crop_region are fercore.framing's face_crop and face_region: the same
    pixels and the same region, aligned or not, for any frame."""
    image, landmarks = two_eyes_and_a_mouth(10)
    detection = Detection((150, 150, 100, 110), 0.9, landmarks)
    for align in (True, False):
        for frame in (FER2013_FRAME, FaceFrame(3.0, 2.8, 0.42, 0.2)):
            (served,) = crop_faces(image, [detection], align, frame)
            shared = face_crop(image, detection.box, detection.landmarks, align, frame)
            np.testing.assert_array_equal(np.asarray(served), np.asarray(shared))
            assert crop_region(detection, image.size, align, frame) == face_region(
                detection.box, detection.landmarks, image.size, align, frame
            )


def test_without_keypoints_the_box_is_cut_with_the_frames_margin() -> None:
    image = Image.fromarray(np.arange(100 * 120, dtype=np.uint32).reshape(100, 120).astype(np.uint8))
    crop = face_crop(image, (10, 20, 30, 40), {}, align=True, frame=FER2013_FRAME)  # no keypoints: the box, even aligned
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(image)[16:64, 7:43])
    assert box_crop(image, (10, 20, 30, 40), FaceFrame(margin=0.0)).size == (30, 40)
    assert expand_box((100, 100, 50, 40), FER2013_FRAME.margin, 1000, 1000) == (95, 96, 60, 48)


def test_clamp_box_keeps_at_least_a_pixel() -> None:
    assert clamp_box(-10, -10, 5, 5, 100, 100) == (0, 0, 1, 1)
    assert clamp_box(150, 20, 10, 10, 100, 100) == (99, 20, 1, 10)
