"""Face detection on its own: the real BlazeFace full-range model from app/assets on ONNX Runtime, on
the public-domain photos scikit-image ships, and the arithmetic around it (decoding, NMS, alignment)."""

from __future__ import annotations

import hashlib
import io
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image, ImageOps

from app import analysis, faces
from app.faces import (
    LANDMARKS,
    MODEL_PATH,
    Detection,
    DetectorConfig,
    FaceDetector,
    FaceDetectorError,
    anchor_centres,
    crop_faces,
    decode,
    weighted_nms,
)
from app.images import decode_image_reduced
from fercore.framing import FER2013_FRAME, MAX_CROP_SIDE
from tests.utils.photos import assert_astronaut_face, photo

# The astronaut's face centre in skimage's 512x512 photo (between the eyes and the mouth), in pixels.
ASTRONAUT_FACE_CENTRE = (226, 118)
# The cameraman in skimage's "camera" photo (512x512, grey): a face in 3/4 view, looking into his camera.
CAMERAMAN_FACE_REGION = (180, 90, 300, 220)  # left, top, right, bottom


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def astronaut() -> Image.Image:
    return photo("astronaut")


def inside(box: tuple[int, int, int, int], region: tuple[int, int, int, int]) -> bool:
    x, y, w, h = box
    left, top, right, bottom = region
    return left <= x and top <= y and x + w <= right and y + h <= bottom


def contains(box: tuple[int, int, int, int], point: tuple[float, float]) -> bool:
    x, y, w, h = box
    return x <= point[0] <= x + w and y <= point[1] <= y + h


def test_model_is_the_one_its_provenance_records() -> None:
    provenance = (MODEL_PATH.parent / "PROVENANCE.md").read_text()
    assert hashlib.sha256(MODEL_PATH.read_bytes()).hexdigest() in provenance
    assert "Apache License 2.0" in provenance


def test_finds_the_astronaut_face_and_its_keypoints(detector: FaceDetector) -> None:
    (face,) = detector.detect(astronaut())
    assert_astronaut_face(face.box)
    assert all(isinstance(v, int) for v in face.box)
    assert 0.5 <= face.score <= 1.0
    assert tuple(face.landmarks) == LANDMARKS
    (rx, ry), (lx, ly), nose, mouth = (face.landmarks[n] for n in ("right_eye", "left_eye", "nose_tip", "mouth"))
    assert rx < nose[0] < lx  # her right eye on the image's left, the nose between the eyes
    assert max(ry, ly) < nose[1] < mouth[1]  # eyes above the nose above the mouth
    for x, y in (face.landmarks[n] for n in ("right_eye", "left_eye", "nose_tip", "mouth")):
        assert contains(face.box, (x, y))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_photos_work_too(detector: FaceDetector, mode: str) -> None:
    image = astronaut().convert(mode)
    if mode == "RGBA":
        image.putalpha(200)
    (face,) = detector.detect(image)
    assert_astronaut_face(face.box)


def test_finds_a_three_quarter_view_face_in_a_grey_photo(detector: FaceDetector) -> None:
    """The cameraman, seen from the side, grey, his camera against his face: Haar misses him."""
    (face,) = detector.detect(photo("camera"))
    assert inside(face.box, CAMERAMAN_FACE_REGION), face.box


def test_finds_the_face_in_a_large_grey_photo(detector: FaceDetector) -> None:
    big = photo("camera").resize((2560, 2560), Image.Resampling.BICUBIC)
    (face,) = detector.detect(big)
    assert inside(face.box, tuple(5 * v for v in CAMERAMAN_FACE_REGION)), face.box  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea", "cat", "immunohistochemistry", "hubble_deep_field", "retina"])
def test_no_face_in_photos_without_people(detector: FaceDetector, name: str) -> None:
    """Coffee, a rocket launch, two cats, cells, galaxies, a retina: no human face."""
    assert detector.detect(photo(name)) == []


@pytest.mark.parametrize("angle", [-45, -30, 30, 45])
def test_finds_faces_turned_up_to_45_degrees(detector: FaceDetector, angle: int) -> None:
    turned = astronaut().rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    (face,) = detector.detect(turned)
    # Where the face centre went: PIL turns counter-clockwise about the centre (y points down).
    a, (x, y), c = math.radians(angle), ASTRONAUT_FACE_CENTRE, 256
    centre = (c + (x - c) * math.cos(a) + (y - c) * math.sin(a), c - (x - c) * math.sin(a) + (y - c) * math.cos(a))
    assert contains(face.box, centre), (face.box, centre)
    (rx, ry), (lx, ly) = face.landmarks["right_eye"], face.landmarks["left_eye"]
    assert math.degrees(math.atan2(ly - ry, lx - rx)) == pytest.approx(-angle, abs=10)  # the eyes' slope follows


def test_face_cut_by_the_border_is_found_and_its_box_stays_inside(detector: FaceDetector) -> None:
    cut = astronaut().crop((190, 80, 512, 380))  # her right cheek and brows are outside
    (face,) = detector.detect(cut)
    x, y, w, h = face.box
    assert (x, y) == (0, 0) and 0 < w <= 100 and 0 < h <= 100
    (crop,) = crop_faces(cut, [face])  # aligned: the part outside the photo is black, not an error
    pixels = np.asarray(crop.convert("L"))
    assert pixels[:, 0].max() == 0 and pixels[:, -1].max() > 0


def test_faces_smaller_than_the_models_input_are_not_returned(detector: FaceDetector, monkeypatch: pytest.MonkeyPatch) -> None:
    small = astronaut().resize((205, 205), Image.Resampling.BILINEAR)  # her face ~42 px
    assert detector.detect(small) == []
    monkeypatch.setattr(faces, "MIN_FACE_PX", 24)  # the model does see it: the 48-px floor drops it
    (face,) = detector.detect(small)
    assert face.box[2] < 48
    bigger = astronaut().resize((256, 256), Image.Resampling.BILINEAR)  # ~52 px: kept
    assert len(detector.detect(bigger)) == 1


def test_the_floor_is_in_pixels_of_the_image_reduced_to_max_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2048-px photo is looked at as if 1024 px: its faces need 96 px, as a JPEG decoded at half size would."""
    big = astronaut().resize((2048, 2048), Image.Resampling.BILINEAR)  # her face ~420 px
    assert len(FaceDetector(DetectorConfig(max_side=1024)).detect(big)) == 1
    assert FaceDetector(DetectorConfig(max_side=192)).detect(big) == []  # 48 * 2048/192 = 512 px needed


def group_photo() -> tuple[Image.Image, list[tuple[int, int]]]:
    """Six real faces (the astronaut's head as photographed, mirrored, in grey, at several sizes)
    pasted along a 1600x600 coffee photo, and where their centres are, left to right."""
    scene = photo("coffee").resize((1600, 600))
    head = astronaut().crop((150, 30, 300, 200))
    heads = [head, ImageOps.mirror(head), head.convert("L").convert("RGB")]
    centres = []
    for i, side in enumerate([150, 130, 180, 140, 160, 135]):
        pasted = heads[i % 3].resize((side, round(side * 1.13)))
        x, y = 40 + i * 260, 60 + (i % 3) * 90
        scene.paste(pasted, (x, y))
        centres.append((x + side // 2, y + pasted.height // 2))
    return scene, centres


def test_every_face_of_a_group_is_found_left_to_right(detector: FaceDetector) -> None:
    scene, centres = group_photo()
    found = detector.detect(scene)
    assert len(found) == len(centres)
    for face, centre in zip(found, centres, strict=True):
        assert contains(face.box, centre), (face.box, centre)


def test_tiny_and_blank_images_have_no_faces(detector: FaceDetector) -> None:
    assert detector.detect(Image.new("L", (16, 16), 128)) == []
    assert detector.detect(Image.new("RGB", (300, 200), (90, 90, 90))) == []
    assert detector.detect(Image.new("RGB", (1, 4000), (255, 255, 255))) == []


def test_concurrent_calls_agree(detector: FaceDetector) -> None:
    """One ONNX Runtime session shared by threads, as the inference slots share it."""
    image = astronaut()
    expected = detector.detect(image)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: detector.detect(image), range(8))) == [expected] * 8


def test_broken_install_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(FaceDetectorError, match="not found"):
        FaceDetector(model_path=tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(FaceDetectorError, match="could not be read"):
        FaceDetector(model_path=junk)
    other = tmp_path / "other.onnx"  # a valid ONNX model, not the detector
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 192, 192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 192, 192])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), other)
    with pytest.raises(FaceDetectorError, match="not the BlazeFace"):
        FaceDetector(model_path=other)


def test_anchors_are_the_centres_of_a_48x48_grid() -> None:
    anchors = anchor_centres()
    assert anchors.shape == (2304, 2)
    np.testing.assert_allclose(anchors[0], [0.5 / 48, 0.5 / 48])
    np.testing.assert_allclose(anchors[1], [1.5 / 48, 0.5 / 48])  # x first, row by row
    np.testing.assert_allclose(anchors[48], [0.5 / 48, 1.5 / 48])


def test_decode_offsets_boxes_and_keypoints_from_their_anchor() -> None:
    anchors = np.array([[0.5, 0.25]], dtype=np.float32)
    raw = np.zeros((1, 16), dtype=np.float32)
    raw[0, :4] = [19.2, -19.2, 96, 48]  # centre moved by +0.1, -0.1; 0.5 x 0.25 of the input
    raw[0, 4:6] = [9.6, 0]  # the first keypoint 0.05 right of the anchor
    boxes, scores = decode(raw, np.array([0.0, 200.0], dtype=np.float32)[:1], anchors)
    np.testing.assert_allclose(boxes[0, :6], [0.35, 0.025, 0.85, 0.275, 0.55, 0.25], atol=1e-6)
    np.testing.assert_allclose(boxes[0, 6:], np.tile([0.5, 0.25], 5), atol=1e-6)
    assert scores[0] == pytest.approx(0.5)
    _, clipped = decode(raw, np.array([-1e9], dtype=np.float32), anchors)  # no overflow warning
    assert clipped[0] == pytest.approx(0.0)


def test_weighted_nms_merges_overlapping_boxes_by_score() -> None:
    rows = np.array(
        [[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [5.0, 5.0, 6.0, 6.0]],
        dtype=np.float32,
    )
    scores = np.array([0.6, 0.9, 0.7], dtype=np.float32)
    (first, s1), (second, s2) = weighted_nms(rows, scores, 0.3)
    assert s1 == pytest.approx(0.9) and s2 == pytest.approx(0.7)  # the best score of each group
    np.testing.assert_allclose(first, [0.06, 0.0, 1.06, 1.0], atol=1e-6)  # (0.6*0 + 0.9*0.1) / 1.5
    np.testing.assert_allclose(second, rows[2])
    assert len(weighted_nms(rows, scores, 0.95)) == 3  # a high threshold keeps both overlapping boxes
    assert weighted_nms(rows[:0], scores[:0], 0.3) == []


def test_detection_scaled_maps_box_and_keypoints() -> None:
    d = Detection((10, 20, 30, 40), 0.9, {"mouth": (15.5, 30.0)})
    assert d.scaled(1.0) is d
    assert d.scaled(2.0) == Detection((20, 40, 60, 80), 0.9, {"mouth": (31.0, 60.0)})


def test_crop_faces_without_alignment_cuts_each_box_with_margin() -> None:
    image = Image.fromarray(np.arange(100 * 120, dtype=np.uint32).reshape(100, 120).astype(np.uint8))
    detections = [Detection((10, 20, 30, 40), 0.9), Detection((100, 80, 20, 20), 0.8)]
    crops = crop_faces(image, detections, align=False, frame=FER2013_FRAME)  # a 10% margin
    assert [c.size for c in crops] == [(36, 48), (22, 22)]  # the second is clipped at the corner
    np.testing.assert_array_equal(np.asarray(crops[0]), np.asarray(image)[16:64, 7:43])
    assert crop_faces(image, detections, align=True, frame=FER2013_FRAME)[0].size == (36, 48)  # no keypoints: the box
    assert [c.size for c in crop_faces(image, detections, align=False)] == [(30, 40), (20, 20)]  # served: no margin


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_reduced_and_its_faces_reported_in_its_pixels(detector: FaceDetector) -> None:
    big = astronaut().resize((2048, 2048), Image.Resampling.BICUBIC)
    image, scale = decode_image_reduced(jpeg(big), 40_000_000, 1024)
    assert image.size == (1024, 1024) and scale == 2.0  # the decoder's 1/2 reduction
    image, scale = decode_image_reduced(jpeg(big), 40_000_000, 1000)
    assert image.size == (1024, 1024)  # never below max_side: 1/4 would give 512
    png = io.BytesIO()
    big.save(png, format="PNG")
    assert decode_image_reduced(png.getvalue(), 40_000_000, 1024)[0].size == (2048, 2048)  # not a JPEG: full size
    (face,) = analysis.locate(*analysis.decode(jpeg(big), 40_000_000, detector), detector).detections
    assert_astronaut_face(face.box, scale=4.0)  # in the 2048-px file's pixels
    assert contains(face.box, face.landmarks["nose_tip"])


def test_wide_photos_are_also_looked_at_in_overlapping_squares() -> None:
    assert faces.windows((640, 480)) == [(0, 0, 640, 480)]  # 4:3: the whole image only
    whole, *squares = faces.windows((1600, 600))
    assert whole == (0, 0, 1600, 600)
    assert [s[2:] for s in squares] == [(600, 600)] * len(squares)
    assert squares[0][0] == 0 and squares[-1][0] + 600 == 1600  # from one end to the other
    assert all(b[0] - a[0] <= 450 for a, b in itertools.pairwise(squares))  # overlap >= 1/4
    assert faces.windows((300, 900))[1:] == [(0, 0, 300, 300), (0, 200, 300, 300), (0, 400, 300, 300), (0, 600, 300, 300)]
    assert faces.windows((10000, 100)) == [(0, 0, 10000, 100)]  # a strip: no squares smaller than the model's input


def test_a_face_cut_by_a_squares_inner_edge_is_left_to_the_other_windows() -> None:
    rows = np.array([[10, 10, 50, 50], [580, 10, 640, 50], [-5, 10, 30, 50]], dtype=np.float32)
    # The square (0, 0, 600, 600) of a 1600x600 photo: its right edge is inside the photo, its left is the photo's.
    np.testing.assert_array_equal(faces.inside_window(rows, (0, 0, 600, 600), (1600, 600)), [True, False, True])


def test_a_crowd_in_a_large_photo_is_found_in_a_grid_of_squares(detector: FaceDetector) -> None:
    """Nine faces of ~100 px in a 1536x1536 JPEG: seen whole, they are 13 px in the model's input."""
    crowd = Image.new("RGB", (1536, 1536))
    for i in range(9):
        crowd.paste(astronaut(), ((i % 3) * 512, (i // 3) * 512))
    (whole, *squares) = faces.windows(crowd.size)
    assert len(squares) == 9 and {s[2] for s in squares} == {768}
    found = analysis.locate(*analysis.decode(jpeg(crowd), 40_000_000, detector), detector).detections
    assert len(found) == 9
    for face in found:
        assert_astronaut_face((face.box[0] % 512, face.box[1] % 512, face.box[2], face.box[3]))
    assert faces.windows(crowd.size, grid=False) == [whole]
    assert len(FaceDetector(DetectorConfig(grid=False)).detect(crowd)) < 9  # the cost of one run


@pytest.mark.parametrize("align", [True, False])
def test_a_face_filling_a_large_photo_is_cropped_at_a_bounded_size(detector: FaceDetector, align: bool) -> None:
    """A crop waits for its forward pass (and is explained at its own size): a face filling a
    3000x3000 photo is cropped at most MAX_CROP_SIDE a side, not ~1800 px."""
    big = photo("astronaut").crop((140, 40, 300, 220)).resize((3000, 3000), Image.Resampling.BILINEAR)
    (found,) = detector.detect(big)
    assert found.box[2] > 4 * MAX_CROP_SIDE  # the face itself is far larger than the cap
    (crop,) = crop_faces(big, [found], align)
    assert max(crop.size) <= MAX_CROP_SIDE and min(crop.size) >= MAX_CROP_SIDE // 2


def test_a_face_filling_the_photo_is_found_zoomed_out(detector: FaceDetector) -> None:
    """A photo cropped to the face (a selfie cut to the face, a face-only data set) is larger than
    the model's anchors expect: seen whole it is missed, so it is looked at again zoomed out; the
    box and keypoints come back in the photo's own pixels."""
    tight = photo("astronaut").crop((180, 65, 270, 160)).resize((100, 110))  # brows to chin
    found = detector._run(tight, (0, 0, *tight.size))[1]
    assert len(found) == 0  # the model alone misses it
    (face,) = detector.detect(tight)
    x, y, w, h = face.box
    assert x >= 0 and y >= 0 and x + w <= 100 and y + h <= 110 and w >= 80  # the face, filling the photo
    (rx, ry), (lx, ly) = face.landmarks["right_eye"], face.landmarks["left_eye"]
    assert 15 < rx < lx < 85 and 25 < ry < 60 and 25 < ly < 60  # the eyes where they are in the crop
    assert detector.detect(photo("coffee")) == []  # and nothing where there is no face, zoomed out or not
