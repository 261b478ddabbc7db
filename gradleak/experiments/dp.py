"""DP-SGD: label recovery from the update of an Opacus client (per-example clipping, then Gaussian noise).

The client (:func:`gradleak.updates_client.dp_sgd_update`) is Opacus itself: ``PrivacyEngine.make_private``
on a copy of the network, ``torch.optim.SGD(lr)``, a data loader of its ONE example (batch size 1, no Poisson
sampling), flat clipping to ``C`` and noise multiplier ``sigma``; one step. It sends

    update = new - old = -lr * (min(1, C / ||g||) * g + N(0, (sigma * C)^2 I))

Clipping norms are RELATIVE to the example's clean gradient norm by default (``clip_scale="relative"``:
``C = clip * ||g||``), so that every trial is clipped by the same factor: 0.1 and 0.5 clip (the update is the
gradient scaled by 0.1 or 0.5), 10 does not (the update is ``-lr * g`` plus noise). A deployment fixes one
absolute C for all examples (``clip_scale="absolute"``); relative norms make "clips or not" the same for every
example. Because the noise is ``sigma * C`` per entry and the signal ``min(1, C/||g||) * ||g|| / sqrt(N)`` per
entry (N parameters), the noise-to-signal ratio is ``sigma * sqrt(N) * max(1, C / ||g||)``: the same for 0.1
and 0.5, ten times larger for 10 (the ``noise_rel`` column: noise std over the clean update's RMS).

The server attacks each update twice (:func:`local_steps.attack_update`: :func:`gradleak.recover_from_update`,
``rank_one_tol=None``, label format detected):

* ``scale="known"``: it is told the learning rate only, as a server is, and takes ``-update / lr`` as the
  gradient. The clip factor is NOT known to it, so whenever clipping is active this "known" scale is wrong;
  the right outcome is then an undetermined answer, and a determined wrong label is counted as confidently
  wrong;
* ``scale="unknown"``: ``recover_from_update(model, update)``, no learning rate.

The evaluator (never the attack) knows the label, the head feature and the true scale ``s = -lr * min(1, C /
||g||)``. Success: max label error < 1e-3 and feature cosine > 0.999 (the label alone is also counted).

Opacus refuses BatchNorm: ResNet18 runs after ``opacus.validators.ModuleValidator.fix`` (BatchNorm ->
GroupNorm), a different network that the attacker is given too (the ``opacus_fix`` column says what was
replaced). Outputs in ``out``: ``dp.csv`` (one row per trial, clip, noise, scale; resumable),
``dp_summary.csv`` / ``.md`` and ``dp.png`` (accuracy and median label error against the noise multiplier, one
colour per clipping norm, solid: unknown scale, dashed: known).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
from torch import nn

from ..labels import LABEL_FORMATS
from ..updates_client import dp_sgd_update, opacus_compatible
from .common import ResumableCSV, Trial, output_dir, resolve_formats, shared_setup, victim, victim_input
from .local_steps import (ATTACK_FIELDS, SCALES, attack_update, check_options, grade_update, sweep_networks,
                          plot_update_curves, trial_fields, write_update_results)
from .noise import gradient_rms

DEFAULT_NETWORKS = ("lenet", "fcn4", "resnet18")
DEFAULT_CLIPS = (0.1, 0.5, 10.0)
DEFAULT_NOISES = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
QUICK_CLIPS = (0.5, 10.0)
QUICK_NOISES = (0.0, 1e-3, 1e-1)
QUICK_SAMPLES = 2
CLIP_SCALES = ("relative", "absolute")
FIELDS = (["dataset", "network", "weights", "opacus_fix", "format", "sample", "clip_scale", "clip", "max_grad_norm",
           "grad_norm", "clip_factor", "noise_multiplier", "noise_std", "noise_rel", "lr"] + ATTACK_FIELDS)
KEY = ["dataset", "network", "weights", "format", "sample", "clip_scale", "clip", "noise_multiplier", "scale"]
SUMMARY_KEYS = ["dataset", "network", "weights", "format", "clip_scale", "clip", "noise_multiplier", "scale"]


def noise_seed(seed: int, label_format: str, sample: int, clip: float, noise_multiplier: float) -> int:
    """Opacus' noise seed for one update, from the VALUES of its settings (adding a level changes no other)."""
    entropy = [int(seed), LABEL_FORMATS.index(label_format), int(sample), int(round(clip * 1e9)),
               int(round(noise_multiplier * 1e9))]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _replaced(original: nn.Module, fixed: nn.Module) -> str:
    """What ``ModuleValidator.fix`` swapped, by module type: "ModuleValidator.fix: BatchNorm2d -> GroupNorm"."""
    before = {type(m).__name__ for m in original.modules()}
    after = {type(m).__name__ for m in fixed.modules()}
    return f"ModuleValidator.fix: {', '.join(sorted(before - after))} -> {', '.join(sorted(after - before))}"


def run(*, dataset: str = "cifar10", network: Union[str, Sequence[str], None] = None, weights: str = "untrained",
        formats: Union[str, Sequence[str]] = ("smoothing", "mixup"), clips: Optional[Sequence[float]] = None,
        clip_scale: str = "relative", noise_multipliers: Optional[Sequence[float]] = None, lr: float = 0.1,
        scales: Sequence[str] = SCALES, samples: Optional[int] = None, seed: int = 2023,
        out: Optional[Union[str, Path]] = None, quick: bool = False, progress: bool = True,
        image_size: Optional[int] = None, figure: bool = True, ray: Optional[str] = None,
        **_ignored) -> Dict[str, Any]:
    """Recovery from Opacus DP-SGD updates; writes ``dp.csv``, ``dp_summary.csv`` / ``.md`` and ``dp.png``.

    Args:
        dataset: a built-in dataset; trials drawn with :func:`common.draw_trials` (seeded, never re-drawn).
        network: a network name, several separated by commas, or None for ``("lenet", "fcn4", "resnet18")``
            (``quick``: ``("lenet",)``). FCN-4 runs on 64x64 inputs unless ``image_size`` is given; networks
            with BatchNorm are fixed for Opacus (see the module docstring).
        weights: "untrained" (seeded init) or a checkpoint path (one network only).
        formats: victim label formats; the attacker detects the format.
        clips: clipping norms, times the example's gradient norm (``clip_scale="relative"``) or absolute
            (default 0.1, 0.5, 10; ``quick``: 0.5, 10).
        noise_multipliers: Opacus' sigma (default 0, 1e-3, 1e-2, 0.1, 1; ``quick``: 0, 1e-3, 0.1).
        lr: the client's learning rate (the "known" scale tells the server this, not the clip factor).
        scales: "known" and/or "unknown".
        samples: trials per format and network (default 10; ``quick``: 2).
        seed: seeds the initialisation, the trials and Opacus' noise.
        out: output folder (default ``results/dp``; resumable).
        quick: the CI preset: LeNet only (unless ``network``), 2 trials per format, fewer clips and noises
            (unless given).
        image_size: input side for every network (None: the dataset's, 64 for FCN-4).
        figure: write the PNG.
        ray: None runs the trials here; "local" or a Ray cluster's address spreads them over Ray
            (:func:`.parallel.map_trials`; the same rows in the same order, ``time_ms`` aside).

    Returns:
        ``dict(summary=[...], files={...}, new_rows=int, out=str)``.
    """
    networks = check_options(network, ("lenet",) if quick else DEFAULT_NETWORKS, weights, scales)
    if clip_scale not in CLIP_SCALES:
        raise ValueError(f"clip_scale must be one of {CLIP_SCALES}, got {clip_scale!r}")
    formats = resolve_formats(formats)
    clips = [float(c) for c in (clips or (QUICK_CLIPS if quick else DEFAULT_CLIPS))]
    noises = [float(s) for s in (noise_multipliers or (QUICK_NOISES if quick else DEFAULT_NOISES))]
    if any(not (c > 0 and math.isfinite(c)) for c in clips):
        raise ValueError(f"clipping norms must be positive and finite, got {clips}")
    count = (QUICK_SAMPLES if quick else 10) if samples is None else int(samples)
    folder = output_dir(out, "dp")
    table = ResumableCSV(folder / "dp.csv", FIELDS, KEY)
    new_rows = sweep_networks(
        table, networks, desc="dp", dataset=dataset, weights=weights, formats=formats, count=count, seed=seed,
        image_size=image_size, ray=ray, progress=progress,
        missing=lambda where: {(c, s, k) for c in clips for s in noises for k in scales
                               if not table.has(**where, clip_scale=clip_scale, clip=repr(c), noise_multiplier=repr(s),
                                                scale=k)},
        task=functools.partial(attack_dp_trial, clip_scale=clip_scale, clips=clips, noises=noises, lr=lr,
                               scales=scales))
    fixed = sorted({f"{r['network']} ({r['opacus_fix']})" for r in table.rows if r["opacus_fix"]})
    notes = (f"One Opacus DP-SGD step (batch size 1, no Poisson sampling, flat clipping, lr {lr:g}) on one example; "
             "the server sees new - old weights. clip: the clipping norm C "
             f"({'times the example gradient norm' if clip_scale == 'relative' else 'absolute'}); noise_multiplier: "
             "Opacus' sigma (noise std sigma * C per entry). Scale known: the server is told lr, not the clip "
             "factor, and takes -update/lr as the gradient (wrong whenever clipping is active); unknown: no lr. "
             "abs(s_hat/s - 1) against s = -lr * min(1, C/||g||)."
             + (f" Changed for Opacus by opacus.validators.ModuleValidator.fix (another network, given to the "
                f"attacker as such): {', '.join(fixed)}." if fixed else ""))
    return write_update_results(table, "dp", SUMMARY_KEYS, ("clip", "noise_multiplier"),
                                title="Label recovery from DP-SGD (Opacus) updates", notes=notes, plot_fn=plot,
                                figure=figure, new_rows=new_rows)


@functools.lru_cache(maxsize=4)
def _opacus_network(network: nn.Module) -> Tuple[nn.Module, str]:
    """The network Opacus trains in place of ``network`` (made once per process for each shared network) and what
    ``ModuleValidator.fix`` replaced in it ("" when nothing)."""
    model, changes = opacus_compatible(network)
    return model, _replaced(network, model) if changes else ""


def attack_dp_trial(job: Tuple[Trial, Set[Tuple[float, float, str]]], *, setting: Mapping[str, Any],
                    clip_scale: str, clips: Sequence[float], noises: Sequence[float], lr: float,
                    scales: Sequence[str]) -> List[Dict[str, Any]]:
    """One trial's ``dp.csv`` rows: one Opacus step per (clip, noise multiplier), each update attacked with each
    scale.

    Args:
        job: ``(trial, missing)``, ``missing`` the ``(clip, noise multiplier, scale)`` rows still to do (a resumed
            run skips the others).
        setting: :func:`common.shared_setup`'s arguments (the networks are built once per process from them).
        clip_scale, clips, noises, lr, scales: the sweep (see :func:`run`), in the rows' order.
    """
    trial, missing = job
    env = shared_setup(**setting)
    model, fix = _opacus_network(env.model)
    where = {**trial_fields(setting, env, trial), "clip_scale": clip_scale}
    truth = victim(model, env.images, trial)
    x = victim_input(env.images, trial)
    grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in truth.gradients.values()))
    rms = gradient_rms(truth.gradients)
    rows = []
    for clip, sigma in ((c, s) for c in clips for s in noises):
        to_attack = [k for k in scales if (clip, sigma, k) in missing]
        if not to_attack:
            continue
        max_grad_norm = clip * grad_norm if clip_scale == "relative" else clip
        update, info = dp_sgd_update(model, x, truth.label, lr=lr, max_grad_norm=max_grad_norm,
                                     noise_multiplier=sigma,
                                     seed=noise_seed(setting["seed"], trial.label_format, trial.sample, clip, sigma))
        update_fields = {**where, "opacus_fix": fix, "clip": clip, "max_grad_norm": max_grad_norm,
                          "grad_norm": info.grad_norm, "clip_factor": info.clip_factor, "noise_multiplier": sigma,
                          "noise_std": info.noise_std, "noise_rel": info.noise_std / (abs(info.scale) * rms),
                          "lr": lr}
        for scale in to_attack:
            attempt, diagnostics = attack_update(model, update, lr=lr if scale == "known" else None)
            rows.append({**update_fields, "scale": scale, **grade_update(attempt, diagnostics, truth, info.scale)})
    return rows


def plot(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``dp.png``: accuracy and median label error against the noise multiplier (0 drawn a decade left of the
    smallest level, labelled 0), one colour per clipping norm, per (network, format); solid lines: unknown
    scale, dashed: known."""
    def name(s: Mapping[str, Any]) -> str:
        return f"C = {s['clip']:g}" + (" x ||g||" if s["clip_scale"] == "relative" else "")

    return plot_update_curves(summary, path, x="noise_multiplier", line="clip", line_label=name,
                              xlabel="noise multiplier")
