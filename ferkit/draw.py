"""Pictures of results, drawn with Pillow: faces boxed and labelled on a photo or a video frame
(with their heatmaps, when explained), and a timeline of each tracked face's emotions.

Pillow rather than matplotlib: it is in the base install already (matplotlib is only in the
training extra), so ``fer-analyze --plot`` works wherever ``fer-analyze`` does, with nothing more
to install; and a timeline is a few lines and a legend, not a plotting library's job.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from app.schemas import Face, FaceTrack, TrackedFace

# One colour per FER2013 class (and a grey for a class the model names otherwise), RGB.
COLOURS = {
    "angry": (220, 50, 47),
    "disgust": (133, 153, 0),
    "fear": (108, 113, 196),
    "happy": (255, 193, 7),
    "sad": (38, 139, 210),
    "surprise": (211, 54, 130),
    "neutral": (147, 161, 161),
}
OTHER = (200, 200, 200)


def colour(emotion: str) -> tuple[int, int, int]:
    return COLOURS.get(emotion, OTHER)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (its fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def annotate(image: Image.Image, faces: Sequence[Face], heatmaps: bool = False) -> Image.Image:
    """An RGB copy of ``image`` with each face boxed in its emotion's colour and labelled (a tracked
    face by its track id and smoothed emotion); ``heatmaps``: explained faces' heatmaps laid over."""
    out = image.convert("RGB")
    if heatmaps:
        for face in faces:
            if face.explanation is not None:
                overlay_heatmap(out, face.explanation.png, face.explanation.box)
    draw = ImageDraw.Draw(out)
    text_font = font(max(12, min(out.size) // 30))
    line = max(2, min(out.size) // 200)
    for i, face in enumerate(faces, start=1):
        emotion, confidence, name = label_parts(face, i)
        x, y, w, h = face.box
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=colour(emotion), width=line)
        text = f"{name} {emotion} {confidence:.0%}"
        left, top, right, bottom = draw.textbbox((x, y), text, font=text_font)
        above = max(0, y - (bottom - top) - 2 * line)
        draw.rectangle((x, above, x + (right - left) + 2 * line, above + (bottom - top) + 2 * line), fill=colour(emotion))
        draw.text((x + line, above + line - (top - y)), text, fill=(0, 0, 0), font=text_font)
    return out


def label_parts(face: Face, position: int) -> tuple[str, float, str]:
    """The emotion, its probability and the name a face is labelled with."""
    if isinstance(face, TrackedFace):
        return face.smoothed_emotion, face.smoothed_scores[face.smoothed_emotion], f"#{face.track_id}"
    return face.emotion, face.confidence, str(position)


def overlay_heatmap(image: Image.Image, png_base64: str, box: tuple[int, int, int, int]) -> None:
    """Lay an explanation's RGBA heatmap over ``box`` of ``image``, in place."""
    heat = Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGBA")
    x, y, w, h = box
    heat = heat.resize((max(1, w), max(1, h)), Image.Resampling.BILINEAR)
    image.paste(heat, (x, y), heat)


def timeline(tracks: Sequence[FaceTrack], classes: Sequence[str], width: int = 960, panel_height: int = 200) -> Image.Image:
    """One panel per track: each class's smoothed probability over time (seconds), in its colour,
    the raw top class as a strip of colour under it, and a legend."""
    margin, legend_h = 48, 28
    panels = max(1, len(tracks))
    out = Image.new("RGB", (width, legend_h + panels * panel_height), "white")
    draw = ImageDraw.Draw(out)
    small = font(13)
    x = margin
    for name in classes:
        draw.rectangle((x, 9, x + 14, 21), fill=colour(name))
        draw.text((x + 18, 7), name, fill=(0, 0, 0), font=small)
        x += 30 + round(draw.textlength(name, font=small))
    end = max((t.last_s for t in tracks), default=0.0) or 1.0
    for row, track in enumerate(tracks):
        draw_panel(draw, track, classes, (margin, legend_h + row * panel_height, width - 16, panel_height), end, small)
    if not tracks:
        draw.text((margin, legend_h + panel_height // 2), "no face found", fill=(0, 0, 0), font=small)
    return out


def draw_panel(
    draw: ImageDraw.ImageDraw,
    track: FaceTrack,
    classes: Sequence[str],
    area: tuple[int, int, int, int],
    end_s: float,
    text_font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    """One track's panel in ``area`` (left, top, right, height); time runs from 0 to ``end_s``."""
    left, top, right, height = area
    plot_top, plot_bottom = top + 22, top + height - 38

    def px(time_s: float, p: float) -> tuple[float, float]:
        return left + (right - left) * time_s / end_s, plot_bottom - (plot_bottom - plot_top) * p

    draw.text((left, top + 4), f"face #{track.id}  ({track.first_s:.1f}-{track.last_s:.1f} s, {len(track.faces)} frames)",
              fill=(0, 0, 0), font=text_font)  # fmt: skip
    draw.rectangle((left, plot_top, right, plot_bottom), outline=(180, 180, 180))
    for p in (0.5,):
        draw.line((*px(0, p), *px(end_s, p)), fill=(225, 225, 225))
    for name in classes:
        points = [px(f.time_s, f.smoothed_scores.get(name, 0.0)) for f in track.faces]
        if len(points) == 1:
            points = points * 2
        draw.line(points, fill=colour(name), width=2)
    strip = plot_bottom + 4
    for a, b in zip(track.faces, [*track.faces[1:], None], strict=True):
        x0 = px(a.time_s, 0)[0]
        x1 = px(b.time_s, 0)[0] if b is not None else x0 + 2
        draw.rectangle((x0, strip, max(x0 + 1, x1), strip + 8), fill=colour(a.emotion))
    for t in ticks(end_s):
        x = px(t, 0)[0]
        draw.line((x, plot_bottom, x, plot_bottom + 3), fill=(120, 120, 120))
        draw.text((x - 6, strip + 12), f"{t:g}s", fill=(90, 90, 90), font=text_font)
    draw.text((left - 40, plot_top - 6), "1.0", fill=(90, 90, 90), font=text_font)
    draw.text((left - 40, plot_bottom - 8), "0.0", fill=(90, 90, 90), font=text_font)


def ticks(end_s: float, most: int = 10) -> list[float]:
    """Round seconds for the time axis, at most ``most`` of them."""
    step = next((s for s in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600) if end_s / s <= most), end_s / most)
    return [round(i * step, 3) for i in range(int(end_s / step) + 1)]
