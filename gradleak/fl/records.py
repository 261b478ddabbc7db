"""What the audit writes: one JSON line per client update, the attacker's (``records.jsonl``) and, in simulation, the
client's own truth (``truth.jsonl``), kept apart so that only the report's evaluation ever joins them.

Both files are JSON lines, appended one object at a time and flushed at once, so a crash loses nothing already
written. Simulated clients run in several processes (Ray workers), so every append takes an exclusive ``flock`` on
the file: lines from different processes never interleave. Non-finite floats (an undefined mixup weight, an
infinite margin) are written as ``null``: the files stay strict JSON.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

from .._json import strict_json

PathLike = Union[str, Path]

RECORDS_FILE = "records.jsonl"
TRUTH_FILE = "truth.jsonl"
CONFIG_FILE = "config.json"
RECONSTRUCTIONS_DIR = "reconstructions"
TRUTH_INPUTS_DIR = "truth-inputs"


@dataclass
class AuditRecord:
    """The attacker's conclusion about one client update (one line of ``records.jsonl``).

    Only what a server sees went into it: the arrays it sent, the arrays the client replied with, the train
    config it set, and the reply's source node id.

    Attributes:
        round: the server round (from 1).
        client: the reply's source node id (the simulated clients write the same id into ``truth.jsonl``).
        error: why the reply could not be read (missing or mis-shaped arrays, NaN, a client error), else None.
        determined: whether the update pins one example's label down (False for a batch); None on error.
        label_format: "hard", "smoothing" or "mixup": the structure the answer has.
        classes: the dominant class, or the two mixed classes.
        eps: the recovered smoothing mass; lam: the mixup weight of ``classes[1]`` (None unless mixup).
        label: the recovered ``(C,)`` label, as C floats (a best guess when ``determined`` is False).
        gradient_scale: ``s`` with ``update = s * gradient``: ``-lr * local_steps`` when the config gave the lr
            and that reading was determined, else the recovered scale.
        scale_source: "config" (the lr of the train config) or "recovered" (the scale was solved for).
        lr, local_steps: what the train config the server set said (None when it did not say).
        batch_size_estimate: the numerical rank of the head's weight update at the update's float precision: the
            apparent number of examples behind it (at most ``rank_limit``; several local steps on one example
            also raise it).
        rank_limit: ``min(C, d)`` of the head: an estimate equal to it means "at least this many".
        rank_one_ratio: ``||G - rank-one fit|| / ||G||`` of the head's update (~1e-7 for one example).
        residual: the label structure's residual at the answer.
        method: the recovery path ("exact", "closed_form", "feature_layer", ...).
        update_norm: L2 norm of the whole update (what a clipping norm bounds).
        reconstruction: path of the reconstructed input (``.npy``, relative to the audit folder), or None.
        reconstruction_method: "analytic" (fully connected nets) or "matching" (gradient matching), or None.
        message: why the answer is not determined, or "".
        seconds: the time the audit spent on this update.
    """

    round: int
    client: int
    error: Optional[str] = None
    determined: Optional[bool] = None
    label_format: Optional[str] = None
    classes: Optional[List[int]] = None
    eps: Optional[float] = None
    lam: Optional[float] = None
    label: Optional[List[float]] = None
    gradient_scale: Optional[float] = None
    scale_source: Optional[str] = None
    lr: Optional[float] = None
    local_steps: Optional[int] = None
    batch_size_estimate: Optional[int] = None
    rank_limit: Optional[int] = None
    rank_one_ratio: Optional[float] = None
    residual: Optional[float] = None
    method: Optional[str] = None
    update_norm: Optional[float] = None
    reconstruction: Optional[str] = None
    reconstruction_method: Optional[str] = None
    message: str = ""
    seconds: float = 0.0


@dataclass
class TruthRecord:
    """What one simulated client really trained on (one line of ``truth.jsonl``; the evaluator's eyes only).

    Attributes:
        round, client: as in :class:`AuditRecord` (``client`` is the client's own node id).
        partition: the client's data partition (its index among the simulated clients).
        batch_size: B, the examples in its local batch.
        labels: ``B`` lists of C floats: the soft targets it trained on.
        lr, local_steps: its SGD learning rate and steps on that batch.
        clip_factor: ``min(1, clip / ||update||)`` applied by its clipping mod (1.0 without clipping).
        clip: its clipping norm (None without clipping).
        noise_std: standard deviation of the local DP noise on every entry of its update (0 without).
        augmentation: "none", "smoothing" or "mixup".
        update_norm: L2 norm of its update before clipping and noise.
        inputs: path of its ``(B, *input_shape)`` inputs (``.npy``, relative to the audit folder).
    """

    round: int
    client: int
    partition: int
    batch_size: int
    labels: List[List[float]]
    lr: float
    local_steps: int
    clip_factor: float
    clip: Optional[float] = None
    noise_std: float = 0.0
    augmentation: str = "none"
    update_norm: Optional[float] = None
    inputs: Optional[str] = None


def append_jsonl(path: PathLike, record: Union[AuditRecord, TruthRecord, Dict[str, object]]) -> None:
    """Append one record as a JSON line, under an exclusive lock, and flush it.

    Safe across processes on one machine (and on file systems that honour ``flock``).
    """
    data = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)
    line = json.dumps(strict_json(data), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            file.write(line)
            file.flush()
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def read_jsonl(path: PathLike) -> Iterator[Dict[str, object]]:
    """The objects of a JSON-lines file, in order; a last line cut short by a crash is skipped."""
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as error:
            if number >= len(lines) - 1:  # an unterminated last line: the writer died mid-line
                return
            raise ValueError(f"{path}: line {number} is not JSON ({error})") from error


def load_records(path: PathLike) -> List[AuditRecord]:
    """``records.jsonl`` as :class:`AuditRecord` objects (unknown keys, from newer versions, are ignored)."""
    names = {f.name for f in dataclasses.fields(AuditRecord)}
    return [AuditRecord(**{k: v for k, v in row.items() if k in names}) for row in read_jsonl(path)]


def load_truth(path: PathLike) -> List[TruthRecord]:
    """``truth.jsonl`` as :class:`TruthRecord` objects."""
    names = {f.name for f in dataclasses.fields(TruthRecord)}
    return [TruthRecord(**{k: v for k, v in row.items() if k in names}) for row in read_jsonl(path)]
