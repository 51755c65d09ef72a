"""Video: ``POST /predict/video`` on a real video (skimage's astronaut, panned and brightening,
written with PyAV), its bounds and bad inputs; the tracker and the smoothing on their own."""

from __future__ import annotations

import io
import math

import av
import pytest
from fastapi.testclient import TestClient

from app.failures import VideoTooLong
from app.schemas import Face
from app.settings import BUNDLED_MODEL
from app.tracking import TAU_S, Tracker, box_iou
from app.video import Video, VideoLimits
from tests.utils.service import clean_service_env, encode, post_image, running_app
from tests.utils.videos import audio_only, frameless_video, huge_frame_video, moving_face_video

CLIP = moving_face_video(2.0)  # 60 frames at 30 fps


@pytest.fixture(scope="module")
def client(bundled_client: TestClient) -> TestClient:
    """The app on the bundled model (a real classifier: the astronaut is happy)."""
    return bundled_client


def post_video(client: TestClient, data: bytes, **params: object) -> dict:
    r = client.post("/predict/video", files={"file": ("clip.mp4", data, "video/mp4")}, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_face_is_tracked_through_a_video_with_one_id(client: TestClient) -> None:
    body = post_video(client, CLIP, fps=5)
    assert body["video"] == {"width": 640, "height": 360, "duration_s": 1.8, "sample_fps": 5.0, "frames_analysed": 10}
    (track,) = body["tracks"]
    faces = track["faces"]
    assert track["id"] == 1 and len(faces) == 10
    assert [f["time_s"] for f in faces] == pytest.approx([i / 5 for i in range(10)])
    assert [f["frame"] for f in faces] == [6 * i for i in range(10)]  # 30 fps sampled at 5
    # The photo pans 120 px right and back: the face moves left, then returns.
    xs = [f["box"][0] for f in faces]
    assert xs[0] - min(xs) > 80 and abs(xs[-1] - xs[0]) < 40, xs
    assert all(f["smoothed_emotion"] == "happy" and f["emotion"] == "happy" for f in faces)
    assert all(abs(sum(f["smoothed_scores"].values()) - 1) < 1e-4 for f in faces)


def test_each_frame_gets_the_faces_post_predict_gives_its_picture(client: TestClient) -> None:
    # One pipeline: the video's first frame, sent as a photo, gets the same face.
    with av.open(io.BytesIO(CLIP)) as container:
        first = next(container.decode(video=0)).to_image()
    (face,) = post_image(client, encode(first, "PNG")).json()["faces"]
    tracked = post_video(client, CLIP, fps=5)["tracks"][0]["faces"][0]
    assert tracked["box"] == face["box"] and tracked["emotion"] == face["emotion"]
    assert tracked["scores"] == pytest.approx(face["scores"], abs=1e-6)
    assert tracked["smoothed_scores"] == pytest.approx(face["scores"], abs=1e-6)  # a track's first face is its own average


def test_detect_false_classifies_each_whole_frame(client: TestClient) -> None:
    body = post_video(client, CLIP, fps=2, detect="false")
    (track,) = body["tracks"]
    assert [f["box"] for f in track["faces"]] == [[0, 0, 640, 360]] * 4


@pytest.mark.parametrize(
    ("data", "status", "detail"),
    [
        (b"", 400, "empty file"),
        (b"\x00\x01 this is not a video" * 50, 400, "corrupt video"),
        (CLIP[: len(CLIP) // 2], 400, "corrupt video"),  # truncated: the MP4's index is at its end
        (audio_only(), 400, "no video stream"),
        (frameless_video(), 400, "video has no frames"),
        (huge_frame_video(), 413, "video frame has too many pixels"),  # refused from the header, before decoding
    ],
    ids=["empty", "garbage", "truncated", "audio-only", "no-frames", "huge-frame"],
)
def test_bad_videos_get_a_clear_4xx(client: TestClient, data: bytes, status: int, detail: str) -> None:
    r = client.post("/predict/video", files={"file": ("clip.mp4", data, "video/mp4")})
    assert (r.status_code, r.json()) == (status, {"detail": detail})


def test_a_damaged_stream_is_a_corrupt_video(client: TestClient) -> None:
    # The MP4's index intact, its picture data overwritten in the middle: no 500, no hang.
    damaged = bytearray(CLIP)
    middle = len(damaged) // 2
    damaged[middle : middle + 4000] = bytes(range(256)) * 15 + bytes(160)
    r = client.post("/predict/video", files={"file": ("clip.mp4", bytes(damaged), "video/mp4")})
    assert r.status_code in (200, 400), r.text  # FFmpeg conceals some damage; what it cannot is a 400
    if r.status_code == 400:
        assert r.json() == {"detail": "corrupt video"}


@pytest.mark.parametrize(
    ("env", "params", "detail"),
    [
        ({"MAX_VIDEO_UPLOAD_BYTES": "10000"}, {}, "file too large"),
        ({"MAX_VIDEO_DURATION_S": "1"}, {}, "video too long"),
        ({"MAX_VIDEO_FRAMES": "3"}, {"fps": 5}, "video has more than 3 frames to analyse"),
        ({"MAX_VIDEO_FRAME_PIXELS": "100000"}, {}, "video frame has too many pixels"),
    ],
    ids=["upload", "duration", "frames", "frame-pixels"],
)
def test_videos_beyond_the_bounds_get_413(monkeypatch: pytest.MonkeyPatch, env: dict, params: dict, detail: str) -> None:
    clean_service_env(monkeypatch)
    with running_app(monkeypatch, MODEL_URI=str(BUNDLED_MODEL), **env) as client:
        r = client.post("/predict/video", files={"file": ("clip.mp4", CLIP, "video/mp4")}, params=params)
        assert (r.status_code, r.json()) == (413, {"detail": detail})
        assert client.app.state.limiter.admitted == 0


def test_fps_out_of_range_is_422(client: TestClient) -> None:
    for fps in (0, 31, -1):
        assert client.post("/predict/video", files={"file": ("clip.mp4", CLIP)}, params={"fps": fps}).status_code == 422


def test_video_frames_are_sampled_at_the_rate_asked() -> None:
    with Video(CLIP) as video:
        assert video.info.fps == 30 and video.info.duration_s == pytest.approx(2.0)
        assert [f.index for f in video.frames(3)] == [0, 10, 20, 30, 40, 50]
    with Video(CLIP) as video:
        assert len(list(video.frames(None))) == 60
    with pytest.raises(VideoTooLong), Video(CLIP, VideoLimits(max_duration_s=1.5)):
        pass  # the header says 2 s: refused as it is opened, before a frame is decoded


def face(box: tuple[int, int, int, int], happy: float) -> Face:
    rest = (1 - happy) / 6
    scores = {name: rest for name in ("angry", "disgust", "fear", "sad", "surprise", "neutral")} | {"happy": happy}
    best = max(scores, key=scores.__getitem__)
    return Face(box=box, emotion=best, confidence=scores[best], scores=scores)


def test_the_tracker_keeps_ids_by_overlap_and_ends_lost_tracks() -> None:
    tracker = Tracker()
    left, right = (10, 10, 100, 100), (300, 10, 100, 100)
    first = tracker.update([face(left, 0.9), face(right, 0.9)], 0, 0.0)
    assert [f.track_id for f in first] == [1, 2]
    moved = tracker.update([face((320, 12, 100, 100), 0.9), face((25, 8, 100, 100), 0.9)], 1, 0.2)  # listed the other way
    assert [f.track_id for f in moved] == [2, 1]
    gone = tracker.update([face(left, 0.9)], 2, 0.4 + tracker.max_gap_s + 0.1)  # both unseen for over max_gap_s
    assert [f.track_id for f in gone] == [3]
    assert box_iou(left, right) == 0.0 and box_iou(left, left) == 1.0


def test_smoothing_is_an_ema_over_time() -> None:
    tracker = Tracker()
    tracker.update([face((0, 0, 100, 100), 0.9)], 0, 0.0)
    (later,) = tracker.update([face((0, 0, 100, 100), 0.1)], 1, TAU_S)  # one time constant later
    weight = 1 - math.exp(-1)
    assert later.smoothed_scores["happy"] == pytest.approx(0.9 + weight * (0.1 - 0.9))
    assert later.emotion != "happy" and later.smoothed_emotion == "happy"  # raw flips, smoothed lags
