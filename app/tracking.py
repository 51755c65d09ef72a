"""Faces followed from frame to frame, each with a stable id and its emotion smoothed over time.

**Tracking.** Each sampled frame's faces are matched to the tracks alive before it by the overlap
(intersection over union) of their boxes with each track's last box, greedily, best pair first,
a pair counting only at :data:`MIN_IOU` or more; a face left over starts a new track (the next id),
and a track not seen for :data:`MAX_GAP_S` seconds ends (a face that comes back later is a new
track). Faces move little between frames sampled a few times a second, and faces of different
people rarely overlap that much: IoU matching is what SORT-style trackers start from, without
their motion model, which a face at a desk does not need.

**Smoothing.** A track's scores are an exponential moving average of its faces' score vectors
over *time*, not frames: ``s <- s + a (p - s)`` with ``a = 1 - exp(-dt / TAU_S)``, ``dt`` the
seconds since the track's previous face; so a face's smoothed emotion answers in about
:data:`TAU_S` whatever the sampling rate, and a gap of many seconds forgets the past. The
smoothed emotion is the argmax of the smoothed scores; the raw ones stay beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.faces import Box
from app.schemas import Face, TrackedFace

MIN_IOU = 0.3
MAX_GAP_S = 1.0
TAU_S = 0.5


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    id: int
    box: Box
    last_s: float
    smoothed: dict[str, float] = field(default_factory=dict)

    def update(self, face: Face, time_s: float, tau_s: float) -> dict[str, float]:
        """Take ``face`` at ``time_s``: the track's new box and smoothed scores."""
        if not self.smoothed:
            self.smoothed = dict(face.scores)
        else:
            a = 1.0 - math.exp(-max(0.0, time_s - self.last_s) / tau_s)
            self.smoothed = {name: s + a * (face.scores[name] - s) for name, s in self.smoothed.items()}
        self.box, self.last_s = face.box, time_s
        return self.smoothed


@dataclass
class Tracker:
    """Gives each face of successive frames its track; see the module's docstring."""

    min_iou: float = MIN_IOU
    max_gap_s: float = MAX_GAP_S
    tau_s: float = TAU_S
    tracks: list[Track] = field(default_factory=list)
    next_id: int = 1

    def update(self, faces: Sequence[Face], frame: int, time_s: float) -> list[TrackedFace]:
        """The faces of the frame at ``time_s``, each with its track id and smoothed emotion."""
        self.tracks = [t for t in self.tracks if time_s - t.last_s <= self.max_gap_s]
        owners = self.match(faces)
        tracked = []
        for i, face in enumerate(faces):
            track = owners.get(i)
            if track is None:
                track = Track(self.next_id, face.box, time_s)
                self.next_id += 1
                self.tracks.append(track)
            smoothed = track.update(face, time_s, self.tau_s)
            best = max(smoothed, key=smoothed.__getitem__)
            tracked.append(
                TrackedFace(
                    **face.model_dump(),
                    track_id=track.id,
                    frame=frame,
                    time_s=round(time_s, 4),
                    smoothed_emotion=best,
                    smoothed_scores=dict(smoothed),
                )
            )
        return tracked

    def match(self, faces: Sequence[Face]) -> dict[int, Track]:
        """Face index -> the live track it continues: greedy on IoU, best pair first."""
        pairs = sorted(
            ((box_iou(track.box, face.box), i, t) for t, track in enumerate(self.tracks) for i, face in enumerate(faces)),
            reverse=True,
        )
        owners: dict[int, Track] = {}
        taken: set[int] = set()
        for overlap, i, t in pairs:
            if overlap < self.min_iou:
                break
            if i not in owners and t not in taken:
                owners[i] = self.tracks[t]
                taken.add(t)
        return owners
