"""Shared pieces of the experiments: networks and data, the seeded sampling protocol, the victim, the evaluator,
the attacks as named methods, resumable CSV files and interval statistics.

Data flow (one way): trial (drawn once, seeded) -> victim gradient -> attack (never sees the truth) ->
evaluator (label / feature metrics against the truth) -> rows.
"""
from __future__ import annotations

import csv
import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..baselines import LABEL_BASELINES, baseline_from_gradients
from ..client import single_example_gradients
from ..data import DATASETS, load_samples, samples_by_class
from ..labels import LABEL_FORMATS, LabelSpec, mix_inputs
from ..models import NETWORK_IMAGE_SIZE, build_model, input_options

PathLike = Union[str, Path]
#: Input side per dataset when the caller does not choose (None: the dataset's own).
EXPERIMENT_IMAGE_SIZE: Dict[str, Optional[int]] = {"digits": 16}
SUCCESS_TOL = 1e-3            # max |label error| below which a recovery counts as a success
FEATURE_COS_TOL = 0.999       # feature cosine above which the feature counts as recovered ...
FEATURE_REL_TOL = 1e-3        # ... together with a relative L2 error below this


# ----------------------------------------------------------------------------------------------- networks, data

@dataclass
class Setup:
    """A network ready to attack and the images to draw victims from.

    Attributes:
        model: the network, eval mode.
        weights: "untrained" or the checkpoint's file stem (goes into every row).
        images: ``(N, channels, H, W)`` normalised inputs; labels: ``(N,)`` int64.
        num_classes: C of the model's head.
    """

    model: nn.Module
    weights: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int


def setup(dataset: str, network: str, weights: str = "untrained", *, seed: int = 0,
          image_size: Optional[int] = None, init: Optional[str] = None) -> Setup:
    """Build (``weights="untrained"``, seeded init) or load (a checkpoint path) ``network`` for ``dataset``.

    An untrained network runs at ``image_size``, else the paper's side for the network
    (:data:`gradleak.models.NETWORK_IMAGE_SIZE`), else :data:`EXPERIMENT_IMAGE_SIZE` or the dataset's own, with
    the dataset's channels. A checkpoint fixes the input size and channels; its class count must match the
    dataset's.
    """
    from ..training import load_checkpoint

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    info = DATASETS[dataset]
    if weights in (None, "untrained"):
        size = image_size or NETWORK_IMAGE_SIZE.get(network) or EXPERIMENT_IMAGE_SIZE.get(dataset) or info.image_size
        model = build_model(network, info.num_classes, init=init, seed=seed,
                            **input_options(network, channels=info.channels, image_size=size))
        name = "untrained"
    else:
        path = Path(weights)
        model = load_checkpoint(path)
        meta = model.checkpoint_info
        if meta.get("model") != network:
            raise ValueError(f"the checkpoint {str(path)!r} holds a {meta.get('model')!r}, not a {network!r}")
        if meta["num_classes"] != info.num_classes:
            raise ValueError(f"the checkpoint has {meta['num_classes']} classes but {dataset} has {info.num_classes}")
        size = meta.get("image_size") or meta["kwargs"].get("image_size") or image_size or info.image_size
        name = path.stem
    images, labels = load_samples(dataset, size=size)
    return Setup(model=model, weights=name, images=images, labels=labels, num_classes=info.num_classes)


def shared_setup(dataset: str, network: str, weights: str = "untrained", *, seed: int = 0,
                 image_size: Optional[int] = None, init: Optional[str] = None) -> Setup:
    """:func:`setup`, built once per process and then shared: the same arguments give the same network (seeded
    initialisation, or the checkpoint), so a trial sent to a Ray worker carries these arguments, not the network,
    and every worker builds it once. Callers leave the shared network as it is (clients train copies of it).

    A checkpoint is read again when its file changes (its modification time and size are part of the key).
    """
    path = Path(weights) if weights not in (None, "untrained") else None
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path is not None and path.exists() else None
    return _setup_once(dataset, network, weights, seed, image_size, init, stamp)


@functools.lru_cache(maxsize=4)
def _setup_once(dataset: str, network: str, weights: str, seed: int, image_size: Optional[int],
                init: Optional[str], stamp: Optional[Tuple[int, int]]) -> Setup:
    return setup(dataset, network, weights, seed=seed, image_size=image_size, init=init)


# ----------------------------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class Trial:
    """One victim example: the images it uses and its label (the evaluator's ground truth).

    ``indices`` has one image (hard, smoothing) or two (mixup, mixed as ``(1 - lam) x_a + lam x_b``).
    """

    label_format: str
    sample: int
    indices: Tuple[int, ...]
    spec: LabelSpec


def _format_rng(seed: int, label_format: str) -> np.random.RandomState:
    """One stream per (seed, format): adding a format never changes another format's trials."""
    state = np.random.SeedSequence([int(seed), LABEL_FORMATS.index(label_format)]).generate_state(1)[0]
    return np.random.RandomState(int(state))


def draw_trials(labels: torch.Tensor, num_classes: int, label_format: str, count: int, seed: int) -> List[Trial]:
    """The sampling protocol of the paper's official notebooks, seeded, drawn once; failures are never re-drawn.

    * smoothing: classes in turn (those present in ``labels``), one image of the class drawn with replacement,
      ``eps ~ U(0, 0.5)``;
    * mixup: the unordered class pairs in turn (``itertools.combinations``), one random image per class,
      ``lam ~ U(0, 1)`` (the weight of the second class);
    * hard: classes in turn, one random image.
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    if count < 1:
        raise ValueError(f"the number of samples must be positive, got {count}")
    by_class = samples_by_class(labels)
    classes = sorted(c for c in by_class if c < num_classes)
    if label_format == "mixup" and len(classes) < 2:
        raise ValueError("mixup needs images of at least two classes")
    rng = _format_rng(seed, label_format)
    pairs = list(itertools.combinations(classes, 2))
    trials = []
    for k in range(count):
        if label_format == "mixup":
            a, b = pairs[k % len(pairs)]
            ia, ib = int(rng.choice(by_class[a])), int(rng.choice(by_class[b]))
            lam = float(rng.uniform(0.0, 1.0))
            trials.append(Trial("mixup", k, (ia, ib), LabelSpec("mixup", num_classes, (a, b), 0.0, lam)))
        else:
            target = classes[k % len(classes)]
            index = int(rng.choice(by_class[target]))
            eps = float(rng.uniform(0.0, 0.5)) if label_format == "smoothing" else 0.0
            trials.append(Trial(label_format, k, (index,), LabelSpec(label_format, num_classes, (target,), eps)))
    return trials


@dataclass
class Victim:
    """What the client sends (``gradients``) and what only the evaluator knows (``label``, ``feature``)."""

    gradients: Dict[str, torch.Tensor]
    label: torch.Tensor      # (C,) float64
    feature: torch.Tensor    # (d,) the true head input


def victim_input(images: torch.Tensor, trial: Trial) -> torch.Tensor:
    """The input the victim trains on: ``images[i]``, or the two images mixed by ``lam`` for mixup (C, H, W)."""
    x = images[trial.indices[0]]
    if trial.label_format == "mixup":
        x = mix_inputs(x, images[trial.indices[1]], trial.spec.lam)
    return x


def victim(model: nn.Module, images: torch.Tensor, trial: Trial) -> Victim:
    """The single-example gradient of ``trial`` (in the model's dtype) and the truth kept for grading."""
    x = victim_input(images, trial)
    label = trial.spec.to_tensor(torch.float64)
    grads = single_example_gradients(model, x, label)
    param = next(model.parameters())
    with torch.no_grad():
        feature = model.features(x.unsqueeze(0).to(device=param.device, dtype=param.dtype))[0] \
            if hasattr(model, "features") else None
    return Victim(grads, label, feature)


# ----------------------------------------------------------------------------------------------- attacks

@dataclass(frozen=True)
class Method:
    """A named attack: a gradleak search with options, or a hard-label baseline."""

    name: str
    kind: str                      # "recover", "chain" (first, then if not converged) or "baseline"
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("exact", "recover", {"method": "exact", "use_feature_layer": True},
           "gradleak's full pipeline: feature-layer closed form when available, else the exact search"),
    Method("exact-head", "recover", {"method": "exact", "use_feature_layer": False},
           "gradleak's exact search on the head gradient alone (the paper's information)"),
    Method("exact-auto", "recover", {"method": "exact", "use_feature_layer": False, "label_format": "auto"},
           "exact search on the head gradient, label format detected (not given)"),
    Method("lbfgs", "recover", {"method": "lbfgs", "use_feature_layer": False},
           "the paper's L-BFGS with plateau skips and sign flip (head gradient only)"),
    Method("pso", "recover", {"method": "pso", "use_feature_layer": False},
           "the paper's PSO: 500 particles x 40 iterations per interval, the paper's intervals"),
    Method("lbfgs+pso", "chain", {"first": {"method": "lbfgs"}, "then": {"method": "pso"}},
           "the paper's pipeline: L-BFGS, then PSO when L-BFGS did not reach its threshold (head gradient only)"),
    Method("pso-quick", "recover", {"method": "pso", "use_feature_layer": False, "population": 100,
                                    "iterations": 20},
           "REDUCED PSO budget (100 particles x 20 iterations): NOT the paper's PSO"),
) + tuple(Method(name, "baseline", {}, f"hard-label baseline {name}") for name in LABEL_BASELINES)}


@dataclass
class Attempt:
    """One attack's answer on one victim (label/feature None when the attack raised)."""

    label: Optional[torch.Tensor]
    feature: Optional[torch.Tensor]
    time_ms: float
    determined: Optional[bool] = None
    pred_format: str = ""
    used: str = ""
    residual: float = math.nan
    evaluations: int = 0
    converged: Optional[bool] = None
    pred_classes: Tuple[int, ...] = ()
    pred_eps: float = math.nan
    pred_lam: Optional[float] = None
    message: str = ""


def attack(method: Union[str, Method], model: nn.Module, gradients: Mapping[str, torch.Tensor],
           label_format: str, *, seed: int = 0, **overrides) -> Attempt:
    """Run one named method on one gradient; exceptions become a failed :class:`Attempt` with the message.

    ``label_format`` is the format the attacker is told (methods with their own, e.g. "exact-auto", ignore
    it); ``overrides`` go to :func:`gradleak.recover_from_gradients` (e.g. ``rank_one_tol=None``).
    """
    from .. import recover_from_gradients

    method = METHODS[method] if isinstance(method, str) else method
    start = time.perf_counter()
    try:
        if method.kind == "baseline":
            res = baseline_from_gradients(model, gradients, method.name)
            elapsed = (time.perf_counter() - start) * 1e3
            return Attempt(res.label, None, elapsed, pred_format="hard", used=res.rule,
                           pred_classes=(res.target,), pred_eps=0.0)
        if method.kind == "chain":
            stages = [{"use_feature_layer": False, **method.options["first"]},
                      {"use_feature_layer": False, **method.options["then"]}]
        else:
            stages = [dict(method.options)]
        for stage in stages:
            options = {"label_format": label_format, **stage, **overrides}
            if options["method"] == "pso":
                options.setdefault("seed", seed)
            res = recover_from_gradients(model, gradients, **options)
            if res.converged:
                break
        return _attempt(res, (time.perf_counter() - start) * 1e3)
    except (ValueError, RuntimeError) as error:
        return Attempt(None, None, (time.perf_counter() - start) * 1e3, message=f"{type(error).__name__}: {error}")


def _attempt(res, time_ms: float) -> Attempt:
    """A :class:`~gradleak.recovery.api.RecoveryResult` as an :class:`Attempt` that took ``time_ms``."""
    return Attempt(res.label, res.feature, time_ms, determined=res.determined, pred_format=res.label_format,
                   used=res.method, residual=res.residual, evaluations=res.evaluations, converged=res.converged,
                   pred_classes=tuple(res.classes), pred_eps=res.eps, pred_lam=res.lam, message=res.message)


def head_only(method: Union[str, Method]) -> bool:
    """Whether ``method`` is the exact search on the head gradient alone: then :func:`attack_heads` recovers
    many victims of one network in one :func:`gradleak.recover_labels` call."""
    method = METHODS[method] if isinstance(method, str) else method
    return method.kind == "recover" and method.options.get("method") == "exact" \
        and not method.options.get("use_feature_layer", True)


def head_entries(model: nn.Module, gradients: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The entries of ``gradients`` that belong to ``model``'s head: all a :func:`head_only` method reads, and
    small enough to keep for many victims."""
    from ..head import find_head

    name, head = find_head(model)
    prefix = f"{name}." if name else ""
    return {prefix + key: gradients[prefix + key] for key, _ in head.named_parameters()}


def attack_heads(method: Union[str, Method], model: nn.Module, gradients: Sequence[Mapping[str, torch.Tensor]],
                 label_format: str) -> List[Attempt]:
    """:func:`attack` with a :func:`head_only` method on many victims of ``model`` at once, from their
    ``gradients`` (each a mapping that holds at least the head's entries, e.g. :func:`head_entries`).

    One :func:`gradleak.recover_labels` call answers them all, as the single calls would (its answers are theirs);
    each attempt's ``time_ms`` is that call's time shared equally. When the call raises (one victim's gradient it
    rejects), the victims are attacked one by one, so that only that victim's attempt fails.
    """
    from .. import recover_labels
    from ..head import find_head, head_gradients

    method = METHODS[method] if isinstance(method, str) else method
    if not head_only(method):
        raise ValueError(f"{method.name} is not the exact search on the head alone")
    found = find_head(model)
    options = {"label_format": label_format,
               **{key: value for key, value in method.options.items() if key != "use_feature_layer"}}
    start = time.perf_counter()
    try:
        parts = [head_gradients(model, named, found) for named in gradients]
        bias_grads = None if parts[0]["bias"] is None else torch.stack([part["bias_grad"] for part in parts])
        results = recover_labels(torch.stack([part["weight_grad"] for part in parts]), parts[0]["weight"],
                                 bias=parts[0]["bias"], bias_grads=bias_grads, **options)
    except (ValueError, RuntimeError):
        return [attack(method, model, named, label_format) for named in gradients]
    share = (time.perf_counter() - start) * 1e3 / len(gradients)
    return [_attempt(res, share) for res in results]


def grade(attempt: Attempt, truth: Victim) -> Dict[str, Any]:
    """Evaluator: label max-error / L1 / cosine and feature cosine of an attempt against the truth."""
    from ..metrics import cosine_similarity, label_error, label_l1

    out: Dict[str, Any] = {"label_error": math.nan, "label_l1": math.nan, "label_cos": math.nan,
                           "feature_cos": math.nan, "feature_rel_error": math.nan, "success": False,
                           "feature_success": ""}
    if attempt.label is not None:
        pred = attempt.label.detach().to(torch.float64)
        out["label_error"] = float(label_error(pred, truth.label))
        out["label_l1"] = float(label_l1(pred, truth.label))
        out["label_cos"] = float(cosine_similarity(pred, truth.label))
        out["success"] = out["label_error"] < SUCCESS_TOL
    if attempt.feature is not None and truth.feature is not None:
        pred, true = attempt.feature.to(torch.float64), truth.feature.to(torch.float64)
        out["feature_cos"] = float(cosine_similarity(pred, true))
        # the cosine alone is blind to the scale (every candidate feature is parallel to the true one for a
        # bias-free head), so the feature also has to match in norm
        out["feature_rel_error"] = float((pred - true).norm() / true.norm().clamp_min(1e-300))
        out["feature_success"] = (out["feature_cos"] > FEATURE_COS_TOL
                                  and out["feature_rel_error"] < FEATURE_REL_TOL)
    return out


# ----------------------------------------------------------------------------------------------- files, statistics

class ResumableCSV:
    """Rows appended to a CSV as they are produced; rows already in the file are not redone.

    Args:
        path: the CSV (created with a header if missing).
        fields: the columns; an existing file must have exactly these.
        key: the columns that identify a row.
    """

    def __init__(self, path: PathLike, fields: Sequence[str], key: Sequence[str]) -> None:
        self.path, self.fields, self.key = Path(path), list(fields), list(key)
        self.rows: List[Dict[str, str]] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames != self.fields:
                    raise ValueError(f"{str(self.path)!r} has columns {reader.fieldnames}, expected {self.fields}: "
                                     "use another output folder or remove the file")
                self.rows = list(reader)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as handle:
                csv.DictWriter(handle, self.fields).writeheader()
        self.done = {self._key(row) for row in self.rows}

    def _key(self, row: Mapping[str, Any]) -> Tuple[str, ...]:
        return tuple(str(row[k]) for k in self.key)

    def has(self, **key: Any) -> bool:
        return self._key(key) in self.done

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = [{k: _cell(row.get(k, "")) for k in self.fields} for row in rows]
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerows(rows)
        self.rows.extend(rows)
        self.done.update(self._key(row) for row in rows)


def write_rows(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` (dicts with the same keys, at least one) as a CSV at ``path``, their keys the header."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value)


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """95 % Wilson score interval ``(low, high)`` of a success rate (``(nan, nan)`` for no trials)."""
    if total == 0:
        return math.nan, math.nan
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def as_float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.median(finite)) if finite else math.nan


def is_true(value: Any) -> bool:
    return str(value) == "True"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def resolve_methods(methods: Union[str, Sequence[str]], quick: bool) -> List[str]:
    """Method names, checked; with ``quick`` the paper's "pso" becomes the clearly labelled "pso-quick"."""
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if quick:
        methods = ["pso-quick" if m == "pso" else m for m in methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return list(dict.fromkeys(methods))


def resolve_formats(formats: Union[str, Sequence[str]]) -> List[str]:
    formats = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in LABEL_FORMATS]
    if unknown:
        raise ValueError(f"unknown label format(s) {unknown}; choose from {LABEL_FORMATS}")
    return formats


def output_dir(out: Optional[PathLike], default: str) -> Path:
    path = Path(out) if out is not None else Path("results") / default
    path.mkdir(parents=True, exist_ok=True)
    return path


ProgressFn = Callable[[Iterable], Iterable]
