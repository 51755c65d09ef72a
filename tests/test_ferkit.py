"""The Python API (:mod:`ferkit`): the faces ``POST /predict`` answers, whatever the image comes as
(a path, bytes, a PIL image, a numpy array), on skimage's real photos; another model by argument
or MODEL_URI; bad input as the service's errors; and no web framework or PyTorch imported."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import ferkit
from app.failures import CorruptImage, ServiceError, UnsupportedImage
from fercore.artifact import ModelLoadError
from ferkit.api import default_analyzer
from tests.utils.photos import assert_astronaut_face, photo, photo_jpeg
from tests.utils.service import ROOT, clean_service_env, post_image, write_model
from tests.utils.videos import moving_face_video


@pytest.fixture(scope="module")
def client(bundled_client: TestClient) -> TestClient:
    """The service on the bundled model, to compare the API's answers with."""
    return bundled_client


@pytest.fixture(scope="module")
def analyzer(module_monkeypatch: pytest.MonkeyPatch) -> ferkit.Analyzer:
    clean_service_env(module_monkeypatch)
    return ferkit.Analyzer(threads=1)


@pytest.fixture
def astronaut_file(tmp_path: Path) -> Path:
    path = tmp_path / "astronaut.jpg"
    path.write_bytes(photo_jpeg("astronaut"))
    return path


def served(client: TestClient, data: bytes, **params: str) -> dict:
    r = client.post("/predict", files={"file": ("photo.jpg", data, "image/jpeg")}, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def dumped(faces: list[ferkit.Face]) -> list[dict]:
    return [face.model_dump(mode="json", exclude_none=True) for face in faces]


def assert_same_faces(ours: list[dict], theirs: list[dict]) -> None:
    """The same boxes, emotions and landmarks, the same scores (to float32 rounding)."""
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a["box"] == b["box"] and a["emotion"] == b["emotion"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
        assert {k: pytest.approx(v, abs=1e-3) for k, v in a["landmarks"].items()} == b["landmarks"]


def test_every_kind_of_image_gets_the_faces_post_predict_gives(client: TestClient, astronaut_file: Path) -> None:
    data = photo_jpeg("astronaut")
    expected = served(client, data)["faces"]
    decoded = Image.open(io.BytesIO(data))
    for image in (astronaut_file, str(astronaut_file), data, decoded, np.asarray(decoded)):
        faces = ferkit.analyze(image)
        assert_same_faces(dumped(faces), expected)
    (face,) = faces
    assert_astronaut_face(face.box)
    assert face.emotion == "happy" and face.confidence > 0.5


def test_other_array_layouts_and_modes(client: TestClient) -> None:
    rgb = np.asarray(photo("astronaut"))
    gray = np.asarray(photo("astronaut").convert("L"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    with_gray = served(client, png(gray))["faces"]
    assert_same_faces(dumped(ferkit.analyze(gray)), with_gray)
    assert_same_faces(dumped(ferkit.analyze(gray[:, :, None])), with_gray)
    assert_same_faces(dumped(ferkit.analyze(rgba)), served(client, png(rgba))["faces"])


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_several_faces_come_left_to_right(client: TestClient) -> None:
    pair = Image.new("RGB", (1024, 512))
    pair.paste(photo("astronaut"), (0, 0))
    pair.paste(photo("astronaut").transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    faces = ferkit.analyze(pair)
    assert len(faces) == 2 and faces[0].box[0] < 512 <= faces[1].box[0]
    assert_same_faces(dumped(faces), served(client, png(np.asarray(pair)))["faces"])


def test_no_face_is_an_empty_list(client: TestClient) -> None:
    assert ferkit.analyze(photo("coffee")) == []
    assert served(client, photo_jpeg("coffee"))["faces"] == []


def test_explain_and_detect_false_as_the_service(client: TestClient, analyzer: ferkit.Analyzer) -> None:
    data = photo_jpeg("astronaut")
    (ours,) = dumped(analyzer.analyze(data, explain=True))
    (theirs,) = served(client, data, explain="true")["faces"]
    assert ours["explanation"]["box"] == theirs["explanation"]["box"]
    assert ours["explanation"]["emotion"] == theirs["explanation"]["emotion"] == "happy"
    assert ours["explanation"]["max_drop"] == pytest.approx(theirs["explanation"]["max_drop"], abs=1e-5)
    assert Image.open(io.BytesIO(base64.b64decode(ours["explanation"]["png"]))).mode == "RGBA"

    crop = photo("astronaut").crop((170, 60, 280, 170))
    whole = ferkit.Analyzer(detect=False, threads=1).analyze(crop)
    assert_same_faces(dumped(whole), served(client, png(np.asarray(crop)), detect="false")["faces"])
    assert whole[0].box == (0, 0, 110, 110)


def test_predict_response_is_post_predicts_json(client: TestClient, analyzer: ferkit.Analyzer) -> None:
    data = photo_jpeg("astronaut")
    ours = json.loads(analyzer.predict_response(data).model_dump_json())
    theirs = served(client, data)
    assert ours["model"] == theirs["model"]
    assert_same_faces(ours["faces"], theirs["faces"])
    assert analyzer.classes == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def test_a_video_gets_what_post_predict_video_answers(client: TestClient, analyzer: ferkit.Analyzer) -> None:
    clip = moving_face_video(1.0)
    r = client.post("/predict/video", files={"file": ("clip.mp4", clip, "video/mp4")}, params={"fps": 5})
    assert r.status_code == 200, r.text
    ours = json.loads(analyzer.analyze_video(clip, fps=5).model_dump_json())
    theirs = r.json()
    assert ours["video"] == theirs["video"] and ours["model"] == theirs["model"]
    ((track,), (their_track,)) = ours["tracks"], theirs["tracks"]
    assert [f["box"] for f in track["faces"]] == [f["box"] for f in their_track["faces"]]
    for a, b in zip(track["faces"], their_track["faces"], strict=True):
        assert a["smoothed_scores"] == pytest.approx(b["smoothed_scores"], abs=1e-6)


def test_another_model_by_argument_or_model_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write_model(tmp_path / "tiny.onnx", run_id="tiny-run")
    clean_service_env(monkeypatch)
    bundled = ferkit.Analyzer(threads=1)
    by_argument = ferkit.Analyzer(tiny, threads=1)
    monkeypatch.setenv("MODEL_URI", str(tiny))
    by_environment = ferkit.Analyzer(threads=1)
    assert by_argument.model == by_environment.model != bundled.model
    assert by_argument.model.version == "tiny-run"
    (face,) = ferkit.analyze(photo_jpeg("astronaut"), model=str(tiny))
    assert face.scores == by_environment.analyze(photo_jpeg("astronaut"))[0].scores
    assert face.scores != bundled.analyze(photo_jpeg("astronaut"))[0].scores
    assert default_analyzer(str(tiny)) is default_analyzer(str(tiny))  # loaded once
    with pytest.raises(ModelLoadError, match="no such model file"):
        ferkit.Analyzer(tmp_path / "missing.onnx")


def test_bad_images_raise_the_services_errors(client: TestClient, tmp_path: Path) -> None:
    for bad, kind in [(b"not an image at all" * 10, UnsupportedImage), (photo_jpeg("astronaut")[:2000], CorruptImage)]:
        with pytest.raises(kind) as caught:
            ferkit.analyze(bad)
        r = post_image(client, bad)
        assert (r.status_code, r.json()) == (caught.value.status_code, {"detail": caught.value.detail})
        assert isinstance(caught.value, ServiceError) and caught.value.client_error
    with pytest.raises(FileNotFoundError):
        ferkit.analyze(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="uint8"):
        ferkit.analyze(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        ferkit.analyze(np.zeros((64, 64, 2), np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        ferkit.analyze([[0, 1], [2, 3]])  # type: ignore[arg-type]


def test_the_api_needs_no_web_framework_nor_pytorch(astronaut_file: Path) -> None:
    # A fresh interpreter: this one has imported torch and FastAPI for the other tests.
    script = (
        "import sys, json, ferkit\n"
        f"faces = ferkit.analyze({str(astronaut_file)!r})\n"
        "video = ferkit.analyze_video(sys.argv[1], fps=5)\n"
        "heavy = ('fastapi', 'starlette', 'uvicorn', 'torch', 'torchvision', 'matplotlib')\n"
        "print(json.dumps([[f.emotion for f in faces], len(video.tracks), [m for m in heavy if m in sys.modules]]))\n"
    )
    clip = astronaut_file.with_name("clip.mp4")
    clip.write_bytes(moving_face_video(1.0))
    out = subprocess.run([sys.executable, "-c", script, str(clip)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [["happy"], 1, []]


def test_frames_located_in_parallel_give_the_same_tracks(analyzer: ferkit.Analyzer) -> None:
    clip = moving_face_video(1.0)
    parallel = ferkit.Analyzer(threads=2)
    assert parallel.core.workers is not None and analyzer.core.workers is None
    ours, theirs = parallel.analyze_video(clip, fps=10), analyzer.analyze_video(clip, fps=10)
    assert len(ours.tracks) == len(theirs.tracks) == 1
    for a, b in zip(ours.tracks[0].faces, theirs.tracks[0].faces, strict=True):
        assert (a.frame, a.box, a.smoothed_emotion) == (b.frame, b.box, b.smoothed_emotion)
        assert a.smoothed_scores == pytest.approx(b.smoothed_scores, abs=1e-6)
