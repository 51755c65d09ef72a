"""The model registry over a storage prefix (a folder or ``gs://bucket/prefix``): which published
run the service serves, a gate on changing it, a history of every change, and rollback.

Layout::

    <prefix>/<run-id>/...          published runs (fercore.storage.publish_run), never modified
    <prefix>/<run-id>/pointer.json the candidate pointer of that run
    <prefix>/latest.json           the served run (fercore.storage.LatestPointer); the service reads only this
    <prefix>/promotions.jsonl      one JSON line per promotion or rollback, append-only

A publication is not a promotion: ``latest.json`` moves to a run only through :func:`promote`
(under a :class:`Gate` unless forced) or :func:`rollback`. Each change is a transaction:

1. read ``latest.json`` and the history, each with its generation;
2. decide (the gate, or the rollback target) against what is served *now*;
3. write ``latest.json`` on condition that it is still that generation; it carries its own event
   (``promotion``), so the history can always be completed from it;
4. append the event to the history, on condition of the history's generation (appends commute:
   a conflict re-reads and appends again; events are ordered by their ``seq``).

A conflict in step 3 (another publisher moved ``latest.json`` in between) starts again at step 1,
so the gate is evaluated against the newer model: no update is lost and no decision rests on a
stale pointer. On GCS the conditions are generation preconditions (``if_generation_match``),
which Cloud Storage enforces; in a folder the whole transaction holds an exclusive lock
(``fcntl.flock`` on ``promotions.lock``), each file is replaced by an atomic rename, and the
condition is the file's content digest (which also catches a writer that ignores the lock). A
process dying after step 3 leaves the history one event short; the next transaction appends it
from ``latest.json`` before anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from fercore import storage
from fercore.storage import LATEST, LatestPointer

log = logging.getLogger(__name__)

HISTORY = "promotions.jsonl"
LOCK = "promotions.lock"  # not a dot file: those are the temp files of atomic writes
MAX_ATTEMPTS = 20  # transactions that lose a race this often in a row are not racing, they are stuck


class Conflict(Exception):
    """A conditional write found the object changed since it was read: start again."""


# ---------------------------------------------------------------------------- the gate


# The real-photo figures a run's metrics carry when trained with --realfaces (training.realfaces).
REALFACES_ACCURACY = "realfaces_dev_accuracy"
REALFACES_SET = "realfaces_dev_set"


@dataclass(frozen=True)
class Gate:
    """When a candidate may replace the served model.

    Its ``val_accuracy`` must reach ``min_accuracy``; and where a model is served, be measured on
    the same validation split of the same dataset (fingerprint) and be no lower than the served
    model's minus ``tolerance``. With ``realfaces_tolerance`` set, its accuracy on the real-photo
    development set (``realfaces_dev_accuracy``, the whole service pipeline on photos that are not
    FER2013: :mod:`training.realfaces`) must also be no lower than the served model's on the same
    photos minus that, so that a model better on FER2013 but worse on real photos is not promoted
    silently. A model that cannot be compared is refused (``--force`` exists).
    """

    tolerance: float = 0.0
    min_accuracy: float = 0.0
    realfaces_tolerance: float | None = None  # None: real photos are not looked at

    def refusal(self, candidate: LatestPointer, current: LatestPointer | None) -> str | None:
        """Why ``candidate`` may not replace ``current``, with the figures; None if it may."""
        acc = _accuracy(candidate)
        if acc is None:
            return f"run {candidate.run_id} has no val_accuracy in its metrics"
        if acc < self.min_accuracy:
            return f"val_accuracy {acc:.4f} of run {candidate.run_id} is below the floor {self.min_accuracy:.4f}"
        if current is None:
            return None
        unlike = _incomparable(candidate, current)
        if unlike:
            return f"run {candidate.run_id} cannot be compared with the promoted run {current.run_id}: {unlike}"
        served = _accuracy(current)
        assert served is not None  # _incomparable checked it
        if acc < served - self.tolerance:
            return (
                f"val_accuracy {acc:.4f} of run {candidate.run_id} is below {served:.4f} of the promoted run "
                f"{current.run_id} (tolerance {self.tolerance:.4f})"
            )
        return self.realfaces_refusal(candidate, current)

    def realfaces_refusal(self, candidate: LatestPointer, current: LatestPointer) -> str | None:
        """Why ``candidate`` reads real photos worse than ``current``; None if it does not (or the
        gate does not look at real photos)."""
        if self.realfaces_tolerance is None:
            return None
        ours, theirs = _number(candidate, REALFACES_ACCURACY), _number(current, REALFACES_ACCURACY)
        if ours is None or theirs is None:
            missing = f"run {candidate.run_id}" if ours is None else f"the promoted run {current.run_id}"
            return f"{missing} has no {REALFACES_ACCURACY} (train with --realfaces DIR to measure it)"
        if candidate.metrics.get(REALFACES_SET) != current.metrics.get(REALFACES_SET):
            return f"run {candidate.run_id} and the promoted run {current.run_id} were measured on different real photos"
        if ours < theirs - self.realfaces_tolerance:
            return (
                f"{REALFACES_ACCURACY} {ours:.4f} of run {candidate.run_id} is below {theirs:.4f} of the promoted run "
                f"{current.run_id} (tolerance {self.realfaces_tolerance:.4f})"
            )
        return None


def _accuracy(pointer: LatestPointer) -> float | None:
    return _number(pointer, "val_accuracy")


def _number(pointer: LatestPointer, key: str) -> float | None:
    value = pointer.metrics.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _incomparable(candidate: LatestPointer, current: LatestPointer) -> str:
    """Why the two val_accuracy figures do not measure the same thing; "" if they do."""
    if _accuracy(current) is None:
        return "the promoted run has no val_accuracy"
    split_a, split_b = candidate.metrics.get("val_split"), current.metrics.get("val_split")
    if not split_a or split_a != split_b:
        return f"validation splits differ ({split_a!r} vs {split_b!r})"
    if not candidate.dataset_fingerprint or candidate.dataset_fingerprint != current.dataset_fingerprint:
        theirs, ours = candidate.dataset_fingerprint or "none", current.dataset_fingerprint or "none"
        return f"dataset fingerprints differ ({theirs} vs {ours})"
    return ""


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Actor:
    """Who or what changes the served model, as the history records it."""

    by: str  # user@host
    command: str  # e.g. "training.train" or "training.promote --run X --force"

    @classmethod
    def here(cls, command: str) -> Actor:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for the uid (some containers)
            user = "unknown"
        return cls(by=f"{user}@{socket.gethostname()}", command=command)


@dataclass(frozen=True)
class Event:
    """One line of the history: ``pointer`` became the served model, replacing ``previous``."""

    seq: int  # 1, 2, ...: the order of the changes of latest.json
    action: str  # "promote" or "rollback"
    at: str  # ISO 8601 UTC
    by: str
    command: str
    forced: bool
    note: str  # what the gate said (also when forced past it)
    pointer: dict[str, Any]  # a LatestPointer without its "promotion"
    previous: dict[str, Any] | None

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @property
    def run_id(self) -> str:
        return str(self.pointer.get("run_id", ""))


def _bare(pointer: LatestPointer) -> dict[str, Any]:
    """The pointer as an event records it: without its own event (no nesting)."""
    data = pointer.to_dict()
    data.pop("promotion", None)
    return data


def _event_of(pointer: LatestPointer) -> Event | None:
    """The event ``latest.json`` carries about itself (None for one written before the registry)."""
    p = pointer.promotion
    if not p or not isinstance(p.get("seq"), int):
        return None
    return Event(
        seq=p["seq"],
        action=str(p.get("action", "promote")),
        at=str(p.get("at", "")),
        by=str(p.get("by", "")),
        command=str(p.get("command", "")),
        forced=bool(p.get("forced", False)),
        note=str(p.get("note", "")),
        pointer=_bare(pointer),
        previous=p.get("previous"),
    )


def _parse_history(raw: bytes | None, where: str) -> list[Event]:
    """The events, ordered by ``seq``, each once (two repairs may both append the same one)."""
    events: dict[int, Event] = {}
    for number, line in enumerate((raw or b"").decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = Event(**json.loads(line))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}:{number} is malformed: {exc}") from None
        events.setdefault(event.seq, event)
    return [events[k] for k in sorted(events)]


# ---------------------------------------------------------------------------- stores


class Store(Protocol):
    """Conditional reads and writes of the registry's small JSON objects."""

    def read(self, name: str) -> tuple[bytes | None, str]:
        """The content (None if absent) and its generation ("0" if absent)."""
        ...

    def write(self, name: str, data: bytes, if_generation: str) -> None:
        """Replace ``name`` if it is still at ``if_generation``, else raise :class:`Conflict`."""
        ...

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Held around one read-decide-write round."""
        ...


class FolderStore:
    """A local folder: an exclusive lock per transaction, atomic renames, digests as generations."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, name: str) -> tuple[bytes | None, str]:
        try:
            data = (self.root / name).read_bytes()
        except FileNotFoundError:
            return None, "0"
        return data, hashlib.sha256(data).hexdigest()

    def write(self, name: str, data: bytes, if_generation: str) -> None:
        if self.read(name)[1] != if_generation:  # someone wrote it without the lock (an older publisher)
            raise Conflict(f"{self.root / name} changed since it was read")
        storage.write_bytes(self.root / name, data)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
            yield


class BucketStore:
    """A GCS prefix: generation preconditions, which Cloud Storage enforces (the emulator does not)."""

    def __init__(self, prefix: str) -> None:
        self.bucket_name, self.prefix = storage.split_gcs(prefix)

    def _name(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> tuple[bytes | None, str]:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        bucket = storage.gcs_client().bucket(self.bucket_name)
        blob = bucket.get_blob(self._name(name))
        if blob is None:
            return None, "0"
        generation = blob.generation
        # The content of the generation just listed, not of a newer one. A fresh Blob: the listed
        # one's mediaLink names the host it was uploaded through (an emulator behind a proxy).
        try:
            data = bucket.blob(self._name(name)).download_as_bytes(if_generation_match=generation)
        except (PreconditionFailed, NotFound):
            raise Conflict(f"{name} changed while it was read") from None
        return data, str(generation)

    def write(self, name: str, data: bytes, if_generation: str) -> None:
        from google.api_core.exceptions import PreconditionFailed

        uri = f"gs://{self.bucket_name}/{self._name(name)}"
        try:
            storage.write_bytes(uri, data, if_generation_match=int(if_generation))
        except PreconditionFailed:
            raise Conflict(f"{uri} changed since it was read") from None

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # optimistic: the preconditions detect a race


def store_for(output: str | Path) -> Store:
    return BucketStore(str(output)) if storage.is_gcs(output) else FolderStore(Path(output))


# ---------------------------------------------------------------------------- transactions


@dataclass(frozen=True)
class Outcome:
    """What a promotion or rollback did, and why."""

    promoted: bool
    reason: str
    pointer: LatestPointer | None  # what latest.json names afterwards
    event: Event | None = None


@dataclass(frozen=True)
class Change:
    """A decision to serve ``target``."""

    target: LatestPointer
    action: str
    forced: bool
    note: str


Decide = Callable[[LatestPointer | None, list[Event]], Change | str]  # a refusal is its reason


def promote(
    output: str | Path,
    candidate: LatestPointer,
    gate: Gate | None,
    actor: Actor,
    store: Store | None = None,
    fingerprint_of: Callable[[LatestPointer], str] | None = None,
) -> Outcome:
    """Serve ``candidate`` (already published) if ``gate`` lets it replace the served model.

    ``gate=None`` forces it: the gate's verdict is still computed and recorded as the note.
    Promoting the model already served changes nothing. ``fingerprint_of`` finds the dataset
    fingerprint of a served model whose ``latest.json`` predates the field (from its checkpoint).
    """

    def decide(current: LatestPointer | None, events: list[Event]) -> Change | str:
        if current is not None and (current.run_id, current.sha256) == (candidate.run_id, candidate.sha256):
            return f"run {candidate.run_id} is already the promoted model"
        if current is not None and not current.dataset_fingerprint and fingerprint_of is not None:
            current = replace(current, dataset_fingerprint=fingerprint_of(current))
        why_not = (gate or Gate()).refusal(candidate, current)
        if gate is not None and why_not:
            return why_not
        note = f"forced past the gate: {why_not}" if gate is None and why_not else "passed the gate"
        return Change(candidate, "promote", forced=gate is None, note=note)

    return _transact(store or store_for(output), decide, actor)


def publish_promoted(
    output: str | Path,
    run_id: str,
    files: dict[str, Path],
    model_name: str = "model.pt",
    metrics: dict[str, Any] | None = None,
    created_at: str = "",
    dataset_fingerprint: str = "",
) -> LatestPointer:
    """:func:`fercore.storage.publish_run`, then serve the run unconditionally (:func:`promote` without
    a gate: recorded in the history, the gate's verdict as its note). ``latest.json`` is written
    after every file it names is in place. Returns the pointer as written to ``latest.json``."""
    candidate = storage.publish_run(output, run_id, files, model_name, metrics, created_at, dataset_fingerprint)
    outcome = promote(output, candidate, gate=None, actor=Actor.here("fercore.registry.publish_promoted"))
    assert outcome.pointer is not None  # without a gate the only refusal is "already served", which has one
    return outcome.pointer


def rollback(output: str | Path, actor: Actor, store: Store | None = None) -> Outcome:
    """Serve again the model served before the current one (repeated: further back)."""

    def decide(current: LatestPointer | None, events: list[Event]) -> Change | str:
        if current is None:
            return f"nothing is promoted in {output}"
        stack = served_stack(events, current)
        if len(stack) < 2:
            return f"run {current.run_id} is the first promoted model: there is nothing to roll back to"
        target = LatestPointer.from_dict(stack[-2], "history")
        if not storage.exists(target.model_uri(output)):  # a run deleted by hand since
            return f"run {target.run_id} cannot be served again: {target.path} is gone"
        return Change(target, "rollback", forced=True, note=f"rolled back from run {current.run_id}")

    return _transact(store or store_for(output), decide, actor)


def history(output: str | Path, store: Store | None = None) -> list[Event]:
    """Every promotion and rollback, oldest first (completed from ``latest.json`` if need be)."""
    store = store or store_for(output)
    raw, _ = store.read(HISTORY)
    events = _parse_history(raw, storage.join(output, HISTORY))
    current = _parse_latest(store.read(LATEST)[0])
    own = _event_of(current) if current is not None else None
    if own is not None and own.seq not in {e.seq for e in events}:
        events.append(own)
    return events


def served_stack(events: list[Event], current: LatestPointer | None) -> list[dict[str, Any]]:
    """The pointers a rollback walks back through, the served one last: each promotion pushes,
    each rollback pops. A change made outside the registry (an older publisher rewriting
    ``latest.json``) shows as an event's ``previous`` that is not the top, and is pushed."""
    stack: list[dict[str, Any]] = []
    for event in events:
        if event.previous is not None and not (stack and _same(stack[-1], event.previous)):
            stack.append(event.previous)
        if event.action == "rollback" and stack:
            stack.pop()
        if not (stack and _same(stack[-1], event.pointer)):
            stack.append(event.pointer)
    if current is not None and not (stack and _same(stack[-1], _bare(current))):
        stack.append(_bare(current))
    return stack


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("run_id"), a.get("sha256")) == (b.get("run_id"), b.get("sha256"))


def _transact(store: Store, decide: Decide, actor: Actor) -> Outcome:
    """Run ``decide`` and apply its change, again from the start whenever a condition fails."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with store.transaction():
                return _attempt(store, decide, actor)
        except Conflict as exc:
            log.info("promotion raced another writer (%s); reading again (attempt %d)", exc, attempt)
            time.sleep(random.uniform(0, min(0.05 * 2**attempt, 2.0)))  # jitter: racers do not collide again
    raise RuntimeError(f"gave up after {MAX_ATTEMPTS} conflicting attempts to change {LATEST}")


def _attempt(store: Store, decide: Decide, actor: Actor) -> Outcome:
    raw, generation = store.read(LATEST)
    current = _parse_latest(raw)
    events = _complete_history(store, current)
    verdict = decide(current, events)
    if isinstance(verdict, str):
        return Outcome(False, verdict, current)
    event = Event(
        seq=max([e.seq for e in events], default=0) + 1,
        action=verdict.action,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        by=actor.by,
        command=actor.command,
        forced=verdict.forced,
        note=verdict.note,
        pointer=_bare(verdict.target),
        previous=_bare(current) if current is not None else None,
    )
    own = {k: v for k, v in event.__dict__.items() if k != "pointer"}
    pointer = replace(verdict.target, promotion=own)
    store.write(LATEST, pointer.to_json(), generation)  # the commit point: a Conflict starts again
    log.info("%s: %s now serves run %s (%s)", event.action, LATEST, pointer.run_id, event.note)
    _append(store, event)
    return Outcome(True, event.note, pointer, event)


def _parse_latest(raw: bytes | None) -> LatestPointer | None:
    """The served pointer; None if there is none, or none the service could follow (a broken
    hand edit): a promotion then replaces it as it would an empty registry."""
    if raw is None:
        return None
    try:
        return LatestPointer.from_dict(json.loads(raw), LATEST)
    except ValueError as exc:  # JSONDecodeError included
        log.warning("%s is unreadable (%s): treated as serving nothing", LATEST, exc)
        return None


def _complete_history(store: Store, current: LatestPointer | None) -> list[Event]:
    """The history, with ``current``'s own event appended if a writer died before recording it."""
    raw, _ = store.read(HISTORY)
    events = _parse_history(raw, HISTORY)
    own = _event_of(current) if current is not None else None
    if own is not None and own.seq not in {e.seq for e in events}:
        log.warning("the history lacks event %d (run %s): appending it from %s", own.seq, own.run_id, LATEST)
        _append(store, own)
        events.append(own)
    return events


def _append(store: Store, event: Event) -> None:
    """Append ``event`` to the history, unless it is there already; retried on conflict."""
    for _ in range(MAX_ATTEMPTS):
        raw, generation = store.read(HISTORY)
        if event.seq in {e.seq for e in _parse_history(raw, HISTORY)}:
            return
        data = (raw or b"") + event.to_json().encode() + b"\n"
        try:
            store.write(HISTORY, data, generation)
            return
        except Conflict:
            time.sleep(random.uniform(0, 0.1))
    raise RuntimeError(f"gave up appending event {event.seq} to {HISTORY}")
