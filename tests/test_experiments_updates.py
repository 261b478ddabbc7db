"""The real-update experiments end to end on their quick presets: files, columns, the truth the evaluator uses,
resumption, and the properties that hold by construction (or are measured robustly: a clean, unclipped update
of an untrained LeNet is recovered)."""
from __future__ import annotations

import csv
import math

import pytest

from gradleak.experiments import EXPERIMENTS
from gradleak.experiments import dp, local_steps


def _rows(path):
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    pytest.importorskip("opacus")
    out = tmp_path_factory.mktemp("dp")
    return out, EXPERIMENTS["dp"](dataset="cifar10", quick=True, seed=5, out=out, progress=False)


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local-steps")
    return out, EXPERIMENTS["local-steps"](dataset="cifar10", quick=True, seed=5, out=out, progress=False)


def test_dp_quick_writes_the_tables_and_the_figure(dp_run):
    out, result = dp_run
    rows = _rows(out / "dp.csv")
    assert list(rows[0]) == dp.FIELDS
    settings = len(dp.QUICK_CLIPS) * len(dp.QUICK_NOISES) * len(local_steps.SCALES)
    assert len(rows) == result["new_rows"] == 2 * dp.QUICK_SAMPLES * settings     # smoothing and mixup
    assert {r["network"] for r in rows} == {"lenet"} and {r["opacus_fix"] for r in rows} == {""}
    summary = _rows(out / "dp_summary.csv")
    assert len(summary) == 2 * settings and {s["n"] for s in summary} == {str(dp.QUICK_SAMPLES)}
    markdown = (out / "dp_summary.md").read_text()
    for column in ("noise_multiplier", "95 % CI", "median max-err", "undetermined", "confident wrong"):
        assert column in markdown
    assert (out / "dp.png").stat().st_size > 0


def test_dp_truth_and_scales(dp_run):
    out, _ = dp_run
    for r in _rows(out / "dp.csv"):
        clip, lr = float(r["clip"]), float(r["lr"])
        # success needs the label; a confidently wrong answer is a wrong label reported as determined
        assert r["success"] == "False" or r["label_success"] == "True"
        assert r["confident_wrong"] == str(r["determined"] == "True" and r["label_success"] == "False")
        assert float(r["max_grad_norm"]) == pytest.approx(clip * float(r["grad_norm"]))      # relative clipping
        assert float(r["clip_factor"]) == pytest.approx(min(1.0, clip))
        assert float(r["true_scale"]) == pytest.approx(-lr * min(1.0, clip))
        assert (float(r["noise_std"]) == 0.0) == (float(r["noise_multiplier"]) == 0.0)
        if r["scale"] == "known":        # the server is told lr only
            assert float(r["est_scale"]) == -lr


def test_dp_clean_updates(dp_run):
    out, _ = dp_run
    clean = [r for r in _rows(out / "dp.csv") if float(r["noise_multiplier"]) == 0.0]
    unclipped = [r for r in clean if float(r["clip"]) >= 1]
    assert unclipped and all(r["success"] == "True" for r in unclipped)
    assert all(float(r["scale_error"]) < 1e-3 for r in unclipped if r["scale"] == "unknown")
    # clipped and taken at the learning rate alone: the wrong scale; never a confident answer
    clipped_known = [r for r in clean if float(r["clip"]) < 1 and r["scale"] == "known"]
    assert clipped_known and all(r["confident_wrong"] == "False" for r in clipped_known)


def test_dp_resumes_without_redoing_rows(dp_run):
    out, _ = dp_run
    again = dp.run(dataset="cifar10", quick=True, seed=5, out=out, progress=False, figure=False)
    assert again["new_rows"] == 0


def test_local_steps_quick(steps_run):
    out, result = steps_run
    rows = _rows(out / "local_steps.csv")
    assert list(rows[0]) == local_steps.FIELDS
    per_trial = len(local_steps.QUICK_STEPS) * len(local_steps.QUICK_LRS) * len(local_steps.SCALES)
    assert len(rows) == result["new_rows"] == 2 * local_steps.QUICK_SAMPLES * per_trial
    assert (out / "local_steps_summary.csv").exists() and (out / "local_steps.png").stat().st_size > 0
    markdown = (out / "local_steps_summary.md").read_text()
    assert "K*lr" in markdown and "median drift" in markdown
    drift = {}
    for r in rows:
        k, lr = int(r["steps"]), float(r["lr"])
        assert float(r["k_lr"]) == pytest.approx(k * lr) and float(r["true_scale"]) == pytest.approx(-k * lr)
        # the evaluator's drift belongs to the update, not to the attack
        assert 0 < float(r["drift"]) <= 1
        assert drift.setdefault((r["format"], r["sample"], k, lr), r["drift"]) == r["drift"]
        if r["scale"] == "known":        # the server divides by K * lr
            assert float(r["est_scale"]) == pytest.approx(-k * lr)
    # one step is a scaled single-example gradient: recovered with the scale known or not
    assert all(r["success"] == "True" for r in rows if r["steps"] == "1")
    # more steps move the update away from rank one
    for lr in local_steps.QUICK_LRS:
        ratio = {k: [float(r["rank_one_ratio"]) for r in rows if int(r["steps"]) == k and float(r["lr"]) == lr]
                 for k in local_steps.QUICK_STEPS}
        assert min(ratio[max(ratio)]) > max(ratio[1])
        assert all(math.isfinite(v) for values in ratio.values() for v in values)
