"""Face detection on its own: the real Haar cascade from the opencv wheel, on the public-domain
photos scikit-image ships, and the box arithmetic around it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import faces
from app.faces import (
    CASCADE_PATH,
    FaceDetector,
    FaceDetectorError,
    clamp_box,
    crop_faces,
    downscale,
    expand_box,
    min_face_side,
    to_image_box,
)
from tests.utils.photos import assert_astronaut_face, photo


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(pool_size=2)


def astronaut() -> Image.Image:
    return photo("astronaut")


def test_cascade_ships_with_opencv() -> None:
    assert CASCADE_PATH.is_file()
    assert CASCADE_PATH.name == "haarcascade_frontalface_default.xml"


def test_finds_the_astronaut_face(detector: FaceDetector) -> None:
    (box,) = detector.detect(astronaut())
    assert_astronaut_face(box)
    assert all(isinstance(v, int) for v in box)


def test_grayscale_photo_works_too(detector: FaceDetector) -> None:
    (box,) = detector.detect(astronaut().convert("L"))
    assert_astronaut_face(box)


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea"])
def test_no_face_in_photos_without_people(detector: FaceDetector, name: str) -> None:
    """Coffee, a rocket launch, and a cat: no human face."""
    assert detector.detect(photo(name)) == []


def test_large_photo_is_downscaled_and_boxes_mapped_back(detector: FaceDetector, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[tuple[int, ...]] = []
    real = faces.downscale

    def spy(gray: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
        small, scale = real(gray, max_side)
        sizes.append(small.shape)
        return small, scale

    monkeypatch.setattr(faces, "downscale", spy)
    big = astronaut().resize((2048, 2048), Image.Resampling.BICUBIC)
    (box,) = detector.detect(big)
    assert sizes == [(1024, 1024)]  # detection ran on the small copy
    assert_astronaut_face(box, scale=4.0)  # the box is in the big image's pixels


def test_tiny_and_blank_images_have_no_faces(detector: FaceDetector) -> None:
    assert detector.detect(Image.new("L", (16, 16), 128)) == []  # smaller than the cascade window
    assert detector.detect(Image.new("RGB", (300, 200), (90, 90, 90))) == []


def test_concurrent_calls_agree(detector: FaceDetector) -> None:
    """Two threads share the detector (one cascade each from its pool), as two inference slots do."""
    image = astronaut()
    expected = detector.detect(image)
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: detector.detect(image), range(4))) == [expected] * 4


def test_broken_install_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(FaceDetectorError, match="not found"):
        FaceDetector(tmp_path / "missing.xml")
    junk = tmp_path / "junk.xml"
    junk.write_text("<opencv_storage><cascade>nonsense</cascade></opencv_storage>")
    with pytest.raises(FaceDetectorError, match="could not be read"):
        FaceDetector(junk)
    empty = tmp_path / "empty.xml"  # well-formed, but no cascade in it: OpenCV loads it empty
    empty.write_text('<?xml version="1.0"?>\n<opencv_storage>\n</opencv_storage>\n')
    with pytest.raises(FaceDetectorError, match="could not be read"):
        FaceDetector(empty)
    with pytest.raises(ValueError, match="pool_size"):
        FaceDetector(pool_size=0)


def test_downscale_keeps_small_images() -> None:
    gray = np.zeros((300, 500), dtype=np.uint8)
    small, scale = downscale(gray, 1024)
    assert small is gray and scale == 1.0
    small, scale = downscale(np.zeros((1000, 3000), dtype=np.uint8), 1024)
    assert small.shape == (341, 1024) and scale == pytest.approx(1024 / 3000)


def test_min_face_side_is_relative_with_a_floor() -> None:
    assert min_face_side((2000, 1000)) == 50
    assert min_face_side((300, 200)) == 48  # the model's input size


def test_to_image_box_scales_back_and_stays_inside() -> None:
    assert to_image_box([10, 20, 30, 40], 0.5, 1000, 1000) == (20, 40, 60, 80)
    assert to_image_box([90, 90, 20, 20], 0.5, 200, 200) == (180, 180, 20, 20)  # clipped at the edge


def test_expand_box_adds_margin_and_clamps() -> None:
    assert expand_box((100, 100, 50, 40), 0.1, 1000, 1000) == (95, 96, 60, 48)
    assert expand_box((0, 0, 50, 50), 0.2, 60, 55) == (0, 0, 60, 55)  # corner face: clipped, not shifted


def test_clamp_box_keeps_at_least_a_pixel() -> None:
    assert clamp_box(-10, -10, 5, 5, 100, 100) == (0, 0, 1, 1)
    assert clamp_box(150, 20, 10, 10, 100, 100) == (99, 20, 1, 10)


def test_crop_faces_cuts_each_box_with_margin() -> None:
    image = Image.fromarray(np.arange(100 * 120, dtype=np.uint32).reshape(100, 120).astype(np.uint8))
    crops = crop_faces(image, [(10, 20, 30, 40), (100, 80, 20, 20)], margin=0.1)
    assert [c.size for c in crops] == [(36, 48), (22, 22)]  # the second is clipped at the corner
    np.testing.assert_array_equal(np.asarray(crops[0]), np.asarray(image)[16:64, 7:43])
