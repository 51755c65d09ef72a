"""``fer-analyze`` (:mod:`ferkit.cli`) on real photos (skimage's), folders and globs of them, and a
real video (the astronaut panned and brightening, written with PyAV): what it prints, the rows it
writes, the pictures and the video it draws, its exit codes and messages for bad usage and bad
input, and that a failed run leaves no output file behind. Run in-process through ``main(argv)``,
and once as the installed console script."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

import ferkit
from ferkit import cli, draw
from ferkit.outputs import Progress, photo_columns, video_columns
from tests.utils.photos import assert_astronaut_face, photo, photo_jpeg
from tests.utils.service import clean_service_env, write_model
from tests.utils.videos import (
    audio_only,
    frameless_video,
    huge_frame_video,
    moving_face_frames,
    moving_face_video,
    two_faces_video,
    video_bytes,
)

CLIP = moving_face_video(2.0)  # 60 frames at 30 fps, 640x360
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
CONSOLE_SCRIPT = Path(sys.executable).with_name("fer-analyze")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_service_env(monkeypatch)  # the bundled model, one thread


@pytest.fixture(scope="module")
def analyzer() -> Iterator[ferkit.Analyzer]:
    with pytest.MonkeyPatch.context() as patch:
        clean_service_env(patch)
        yield ferkit.Analyzer(threads=1)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a photo of one face, a video, and nothing else; the current directory."""
    (tmp_path / "astronaut.jpg").write_bytes(photo_jpeg("astronaut"))
    (tmp_path / "clip.mp4").write_bytes(CLIP)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- one photo ---------------------------------------------------------------------------------


def test_a_photo_prints_each_face(work: Path, capsys: pytest.CaptureFixture[str], analyzer: ferkit.Analyzer) -> None:
    status, out, err = run(capsys, "astronaut.jpg")
    assert (status, err) == (0, "")
    (face,) = analyzer.analyze(photo_jpeg("astronaut"))
    x, y, w, h = face.box
    assert out == f"astronaut.jpg: face 1: happy {face.confidence:.0%} at x={x} y={y} w={w} h={h}\n"
    assert_astronaut_face(face.box)

    (work / "coffee.png").write_bytes(png(photo("coffee")))
    assert run(capsys, "coffee.png") == (0, "coffee.png: no face found\n", "")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_json_is_the_apis(work: Path, capsys: pytest.CaptureFixture[str], analyzer: ferkit.Analyzer) -> None:
    status, out, _ = run(capsys, "astronaut.jpg", "--json")
    assert status == 0
    assert json.loads(out) == json.loads(analyzer.predict_response(photo_jpeg("astronaut")).model_dump_json())


def test_annotate_draws_each_box_and_label(work: Path, capsys: pytest.CaptureFixture[str], analyzer: ferkit.Analyzer) -> None:
    assert run(capsys, "astronaut.jpg", "--annotate", "boxed.png")[0] == 0
    boxed = np.asarray(Image.open(work / "boxed.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(work / "astronaut.jpg").convert("RGB")).astype(int)
    assert boxed.shape == original.shape
    (face,) = analyzer.analyze(photo_jpeg("astronaut"))
    x, y, w, h = face.box
    left_edge = boxed[y + h // 4 : y + 3 * h // 4, x]
    assert (np.abs(left_edge - draw.colour("happy")).max(axis=1) < 40).mean() > 0.9  # the box, in happy's colour
    outside = np.ones(original.shape[:2], bool)
    outside[max(0, y - 40) : y + h + 2, x - 2 : x + w + 120] = False  # the box and its label above it
    assert np.abs(boxed - original)[outside].max() == 0  # the rest untouched

    assert run(capsys, "astronaut.jpg", "--annotate", "explained.jpg", "--explain")[0] == 0
    explained = np.asarray(Image.open(work / "explained.jpg").convert("RGB")).astype(int)
    inside = (slice(y + h // 4, y + 3 * h // 4), slice(x + w // 4, x + 3 * w // 4))
    assert Image.open(work / "explained.jpg").format == "JPEG"
    assert np.abs(explained[inside] - boxed[inside]).mean() > 10  # a heatmap over the face


def test_explain_with_json_adds_the_heatmaps(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "astronaut.jpg", "--json", "--explain")
    (face,) = json.loads(out)["faces"]
    assert status == 0 and face["explanation"]["emotion"] == "happy"


# --- folders and globs ---------------------------------------------------------------------------


@pytest.fixture
def album(work: Path) -> Path:
    """Photos in a folder and its subfolder: one face, two faces, none, and a broken file."""
    folder = work / "album"
    (folder / "trip").mkdir(parents=True)
    (folder / "astronaut.jpg").write_bytes(photo_jpeg("astronaut"))
    pair = Image.new("RGB", (1024, 512))
    pair.paste(photo("astronaut"), (0, 0))
    pair.paste(photo("astronaut").transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    (folder / "trip" / "pair.png").write_bytes(png(pair))
    (folder / "trip" / "coffee.jpg").write_bytes(photo_jpeg("coffee"))
    (folder / "broken.jpg").write_bytes(photo_jpeg("astronaut")[:1500])
    (folder / "notes.txt").write_text("not a photo: a folder's other files are left alone")
    return folder


def test_a_folder_to_csv_one_row_per_face(album: Path, capsys: pytest.CaptureFixture[str], analyzer: ferkit.Analyzer) -> None:
    status, out, err = run(capsys, "album", "--output", "faces.csv")
    assert status == 2  # as documented: a folder's unreadable files make the status 2
    assert out == ""
    assert err == "fer-analyze: skipped album/broken.jpg: corrupt image\nfer-analyze: 3 photos analysed, 1 skipped\n"
    with open(album.parent / "faces.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == photo_columns(CLASSES)
    assert [(r["file"], r["face"]) for r in rows] == [
        ("album/astronaut.jpg", "1"),
        ("album/trip/pair.png", "1"),
        ("album/trip/pair.png", "2"),
    ]
    (face,) = analyzer.analyze(album / "astronaut.jpg")
    first = rows[0]
    assert [int(first[k]) for k in ("x", "y", "width", "height")] == list(face.box)
    assert first["emotion"] == face.emotion == "happy"
    assert {c: float(first[c]) for c in CLASSES} == pytest.approx(face.scores, abs=1e-6)
    assert int(rows[1]["x"]) < 512 <= int(rows[2]["x"])


def test_a_glob_to_json_lines(album: Path, capsys: pytest.CaptureFixture[str], analyzer: ferkit.Analyzer) -> None:
    status, _, err = run(capsys, "album/**/*.png", "album/*.jpg", "--output", "faces.jsonl")
    assert status == 2 and "skipped album/broken.jpg: corrupt image" in err
    records = [json.loads(line) for line in (album.parent / "faces.jsonl").read_text().splitlines()]
    assert [(r["file"], r["face"]) for r in records] == [
        ("album/trip/pair.png", 1),
        ("album/trip/pair.png", 2),
        ("album/astronaut.jpg", 1),
    ]
    (face,) = analyzer.analyze(album / "astronaut.jpg")
    assert records[2] == {"file": "album/astronaut.jpg", "face": 1, **json.loads(face.model_dump_json(exclude_none=True))}


def test_a_folder_on_two_threads_writes_the_same_rows(
    album: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = sorted(album.rglob("*.[jp][pn]g"))
    (album / "more").mkdir()
    for copy in range(3):  # more photos than are kept in flight (ferkit.api.ordered_map's 8)
        for photo_path in photos:
            (album / "more" / f"{copy}-{photo_path.name}").write_bytes(photo_path.read_bytes())
    one = run(capsys, "album", "--output", "one.csv")
    monkeypatch.setenv("INFERENCE_THREADS", "2")  # two photos at once
    two = run(capsys, "album", "--output", "two.csv")
    assert one == two and one[0] == 2
    assert one[2].count("skipped album/") == 4 and one[2].endswith("12 photos analysed, 4 skipped\n")  # broken.jpg, 3 copies
    assert (album.parent / "one.csv").read_text() == (album.parent / "two.csv").read_text()


def test_readable_photos_exit_0_and_print_without_output(album: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (album / "broken.jpg").unlink()
    status, out, err = run(capsys, "album")
    assert (status, err) == (0, "")
    assert out.splitlines()[0].startswith("album/astronaut.jpg: face 1: happy ")
    assert "album/trip/coffee.jpg: no face found" in out and out.count("album/trip/pair.png: face") == 2
    status, out, _ = run(capsys, "album", "--json")  # JSON Lines on stdout
    assert status == 0 and [json.loads(line)["file"] for line in out.splitlines()].count("album/trip/pair.png") == 2


def test_the_progress_bar_is_drawn_on_a_terminal_only() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = Progress(4, "photos", stream)
        for _ in range(4):
            bar.update()
        bar.close()
    assert re.search(r"\r\[#{30}\] 4/4 photos [\d.]+/s\n$", terminal.getvalue()), terminal.getvalue()
    assert pipe.getvalue() == ""


# --- a video ---------------------------------------------------------------------------------------


def test_a_video_to_rows_a_timeline_and_an_annotated_copy(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["clip.mp4", "--fps", "5", "--output", "frames.csv", "--plot", "timeline.png", "--annotate", "out.mp4"]
    assert run(capsys, *argv) == (0, "", "")
    with open(work / "frames.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == video_columns(CLASSES)
    assert [float(r["time_s"]) for r in rows] == pytest.approx([i / 5 for i in range(10)])
    assert [int(r["frame"]) for r in rows] == [6 * i for i in range(10)]
    assert {r["track_id"] for r in rows} == {"1"}
    assert {r["smoothed_emotion"] for r in rows} == {"happy"}
    assert all(abs(sum(float(r[f"smoothed_{c}"]) for c in CLASSES) - 1) < 1e-4 for r in rows)

    timeline = Image.open(work / "timeline.png")
    assert timeline.format == "PNG" and timeline.width == 960
    assert (np.abs(np.asarray(timeline.convert("RGB")).astype(int) - draw.colour("happy")).max(axis=2) < 10).sum() > 500

    with av.open(str(work / "out.mp4")) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert (stream.codec_context.name, stream.average_rate) == ("h264", 5)
    assert len(frames) == 10 and frames[0].shape == (360, 640, 3)
    with av.open(io.BytesIO(CLIP)) as container:
        source = next(container.decode(video=0)).to_ndarray(format="rgb24")
    x, y, h = (int(rows[0][k]) for k in ("x", "y", "height"))
    rows_of_edge = slice(y + h // 4, y + 3 * h // 4)

    def off_happy(frame: np.ndarray) -> float:  # how far the box's left edge is from happy's colour
        return float(np.abs(frame[rows_of_edge, x].astype(int) - draw.colour("happy")).mean())

    assert off_happy(frames[0]) < 0.5 * off_happy(source)  # H.264's 4:2:0 blurs a thin line's colour


def test_a_video_prints_its_tracks_or_the_apis_json(
    work: Path, capsys: pytest.CaptureFixture[str], analyzer: ferkit.Analyzer
) -> None:
    status, out, _ = run(capsys, "clip.mp4", "--fps", "5")
    assert status == 0
    assert out == (
        "clip.mp4: 10 frames analysed over 1.8 s, 1 faces\nclip.mp4: face #1: 0.0-1.8 s, 10 frames, mostly happy (100%)\n"
    )
    status, out, _ = run(capsys, "clip.mp4", "--json", "--fps", "0", "--output", "every.jsonl")
    assert status == 0
    assert json.loads(out) == json.loads(analyzer.analyze_video(CLIP).model_dump_json())
    records = [json.loads(line) for line in (work / "every.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(60)) and records[0]["file"] == "clip.mp4"


def test_two_faces_keep_their_ids_through_a_video(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "pair.mp4").write_bytes(two_faces_video(2.0))
    assert run(capsys, "pair.mp4", "--fps", "5", "--output", "pair.csv", "--plot", "pair.png")[0] == 0
    with open(work / "pair.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_track: dict[str, list[int]] = {}
    for row in rows:
        by_track.setdefault(row["track_id"], []).append(int(row["x"]))
    assert sorted(by_track) == ["1", "2"] and [len(xs) for xs in by_track.values()] == [10, 10]
    assert all(x < 640 for x in by_track["1"]) and all(x >= 640 for x in by_track["2"])  # never swapped
    assert Image.open(work / "pair.png").height == 28 + 2 * 200  # a panel per face (ferkit.draw.timeline)


def test_a_video_with_an_odd_frame_size_is_annotated(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # H.264's 4:2:0 needs even sides: the annotated copy drops the odd column and row.
    (work / "odd.mkv").write_bytes(video_bytes(moving_face_frames(6, (321, 181)), fps=6, codec="ffv1", fmt="matroska"))
    assert run(capsys, "odd.mkv", "--fps", "0", "--annotate", "odd.mp4")[0] == 0
    with av.open(str(work / "odd.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 6 and (frames[0].width, frames[0].height) == (320, 180)


# --- bad usage, bad input: exit 2, one line, no output file -----------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["astronaut.jpg", "--output", "faces.txt"], "--output must end in .csv or .jsonl, not faces.txt"),
        (["astronaut.jpg", "--plot", "t.png"], "--plot needs a video"),
        (["clip.mp4", "--plot", "t.jpg"], "--plot must end in .png, not t.jpg"),
        (["clip.mp4", "--annotate", "out.avi"], "--annotate for a video must end in .mp4, not out.avi"),
        (["astronaut.jpg", "--annotate", "out.xyz"], "--annotate for a photo must end in .jpg, .png or another image suffix"),
        ([".", "--annotate", "out.jpg"], "--annotate takes one photo or one video"),
        (["clip.mp4", "--explain"], "--explain is for photos"),
        (["clip.mp4", "--fps", "-1"], "--fps must be 0 (every frame) or more"),
    ],
)
def test_bad_usage_exits_2(work: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.startswith("usage: fer-analyze") and f"fer-analyze: error: {message}" in err
    assert files_in(work) == {"astronaut.jpg", "clip.mp4"}


def test_argparse_errors_exit_2(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["astronaut.jpg", "--bogus"], [], ["clip.mp4", "--fps", "ten"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
        assert "fer-analyze: error: " in capsys.readouterr().err


PHOTO_OUTPUTS = ["--output", "rows.csv", "--annotate", "boxed.png"]
VIDEO_OUTPUTS = ["--output", "rows.jsonl", "--annotate", "out.mp4", "--plot", "t.png"]


@pytest.mark.parametrize(
    ("name", "data", "outputs", "message"),
    [
        ("missing.jpg", None, PHOTO_OUTPUTS, "missing.jpg: no such file or folder"),
        ("empty", b"", ["--output", "rows.csv"], "no photos in empty"),
        ("broken.jpg", photo_jpeg("astronaut")[:1500], PHOTO_OUTPUTS, "broken.jpg: corrupt image"),
        ("garbage.mp4", b"\x00\x01 this is not a video" * 50, VIDEO_OUTPUTS, "garbage.mp4: corrupt video"),
        ("truncated.mp4", CLIP[: len(CLIP) // 2], VIDEO_OUTPUTS, "truncated.mp4: corrupt video"),
        ("tone.m4a", audio_only(), PHOTO_OUTPUTS, "tone.m4a: no video stream"),
        ("frameless.avi", frameless_video(), VIDEO_OUTPUTS, "frameless.avi: video has no frames"),
        ("huge.mov", huge_frame_video(), VIDEO_OUTPUTS, "huge.mov: video frame has too many pixels"),  # 100 Mpx
        ("notes.txt", b"a note, not a photo", PHOTO_OUTPUTS, "notes.txt: not a photo or a video this program can read"),
    ],
)
def test_unreadable_input_exits_2_and_writes_nothing(
    work: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes | None, outputs: list[str], message: str
) -> None:
    if name == "empty":
        (work / name).mkdir()
    elif data is not None:
        (work / name).write_bytes(data)
    before = files_in(work)
    assert run(capsys, name, *outputs) == (2, "", f"fer-analyze: error: {message}\n")
    assert files_in(work) == before  # no rows, no picture, no temporary file


def test_a_video_failing_half_way_leaves_the_old_outputs(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An MPEG-TS whose frames grow from 640x360 to 1280x720 after a second: its header passes
    # MAX_IMAGE_PIXELS, its 31st frame does not; by then rows and frames have been written.
    grows = video_bytes(moving_face_frames(30), fmt="mpegts") + video_bytes(moving_face_frames(30, (1280, 720)), fmt="mpegts")
    (work / "grows.ts").write_bytes(grows)
    (work / "rows.csv").write_text("yesterday's rows\n")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", str(640 * 360 * 2))
    status, out, err = run(capsys, "grows.ts", "--fps", "0", "--output", "rows.csv", "--annotate", "out.mp4", "--plot", "t.png")
    assert (status, out, err) == (2, "", "fer-analyze: error: grows.ts: video frame has too many pixels\n")
    assert (work / "rows.csv").read_text() == "yesterday's rows\n"
    assert files_in(work) == {"astronaut.jpg", "clip.mp4", "grows.ts", "rows.csv"}


def test_an_output_that_cannot_be_written_exits_1(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for outputs in (["--output", "astronaut.jpg/rows.csv"], ["--annotate", "clip.mp4/boxed.jpg"]):
        status, out, err = run(capsys, "astronaut.jpg", *outputs)
        assert (status, out) == (1, "")
        assert re.fullmatch(rf"fer-analyze: error: {re.escape(outputs[1])}: cannot write it: [^\n]+\n", err), err
    assert files_in(work) == {"astronaut.jpg", "clip.mp4"}


def test_a_model_that_cannot_load_exits_1(work: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(capsys, "astronaut.jpg", "--model", str(tmp_path / "missing.onnx"))
    assert (status, out) == (1, "")
    assert err == f"fer-analyze: error: model not loaded: {tmp_path / 'missing.onnx'}: no such model file or folder\n"


def test_another_model_and_no_detect(work: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    tiny = write_model(tmp_path / "models" / "tiny.onnx", run_id="tiny-run")
    status, out, _ = run(capsys, "astronaut.jpg", "--json", "--model", str(tiny), "--no-detect")
    body = json.loads(out)
    assert status == 0 and body["model"]["version"] == "tiny-run"
    assert [face["box"] for face in body["faces"]] == [[0, 0, 512, 512]]


# --- the installed console script -----------------------------------------------------------------


def test_the_console_script(work: Path, analyzer: ferkit.Analyzer) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_URI", "MAX_IMAGE_PIXELS")}
    done = subprocess.run([CONSOLE_SCRIPT, "astronaut.jpg", "--json"], cwd=work, env=env, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == json.loads(analyzer.predict_response(photo_jpeg("astronaut")).model_dump_json())

    failed = subprocess.run([CONSOLE_SCRIPT, "nope.mp4"], cwd=work, env=env, capture_output=True, text=True)
    assert (failed.returncode, failed.stdout, failed.stderr) == (2, "", "fer-analyze: error: nope.mp4: no such file or folder\n")
    helped = subprocess.run([CONSOLE_SCRIPT, "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and re.search(r"Exit status: 0 done, 1 failure, 2 bad usage", helped.stdout)
