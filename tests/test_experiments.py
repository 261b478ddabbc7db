"""Experiments end to end on small settings: files, columns, the protocol, resumption, noise at std 0."""
from __future__ import annotations

import csv
import math
import shutil

import pytest
import torch

from gradleak.experiments import EXPERIMENTS, run_experiment
from gradleak.experiments import common, label_recovery, landscape, noise



def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("label-recovery")
    result = label_recovery.run(dataset="cifar10", network="lenet", formats=("smoothing", "mixup", "hard"),
                                methods=("exact", "exact-head", "lbfgs", "pso", "idlg"), quick=True, seed=7,
                                out=out, progress=False)
    return out, result


def test_label_recovery_quick_writes_tables(quick_run):
    out, result = quick_run
    rows = _rows(out / "samples.csv")
    assert list(rows[0]) == label_recovery.SAMPLE_FIELDS
    assert len(rows) == 3 * label_recovery.QUICK_SAMPLES * 5
    assert {r["method"] for r in rows} == {"exact", "exact-head", "lbfgs", "pso-quick", "idlg"}  # quick: pso-quick
    summary = _rows(out / "summary.csv")
    assert list(summary[0]) == label_recovery.SUMMARY_FIELDS
    markdown = (out / "summary.md").read_text()
    for column in ("accuracy", "95 % CI", "undetermined", "median ms", "× faster than", "pso-quick", "NOT the paper"):
        assert column in markdown
    # the exact pipeline recovers every soft label and its feature; the hard-label baseline fails on them
    for r in rows:
        if r["method"] in ("exact", "exact-head"):
            assert r["success"] == "True", r
            assert float(r["label_error"]) < 1e-3 and r["feature_success"] == "True"
        if r["method"] == "idlg":
            assert (r["success"] == "True") == (r["format"] == "hard")
    assert {r["used"] for r in rows if r["method"] == "exact"} == {"feature_layer"}
    assert {r["used"] for r in rows if r["method"] == "exact-head"} == {"exact"}


def test_label_recovery_protocol_is_seeded_and_never_redraws(quick_run):
    _, result = quick_run
    images_labels = common.setup("cifar10", "lenet", seed=7)
    first = common.draw_trials(images_labels.labels, 10, "mixup", 12, seed=7)
    again = common.draw_trials(images_labels.labels, 10, "mixup", 12, seed=7)
    assert first == again
    assert all(0 <= t.spec.lam <= 1 and t.spec.classes[0] < t.spec.classes[1] for t in first)
    assert all(int(images_labels.labels[i]) == c for t in first for i, c in zip(t.indices, t.spec.classes))
    smooth = common.draw_trials(images_labels.labels, 10, "smoothing", 12, seed=7)
    assert all(0 <= t.spec.eps <= 0.5 for t in smooth)
    assert {s["n"] for s in result["summary"]} == {label_recovery.QUICK_SAMPLES}   # failures kept, not re-drawn


def test_label_recovery_resume_skips_done_rows(quick_run, tmp_path):
    out, _ = quick_run
    again = label_recovery.run(dataset="cifar10", network="lenet", formats=("smoothing", "mixup", "hard"),
                               methods=("exact", "exact-head", "lbfgs", "pso", "idlg"), quick=True, seed=7,
                               out=out, progress=False)
    assert again["new_rows"] == 0
    # a partial file is completed, not redone
    partial = tmp_path / "partial"
    label_recovery.run(dataset="cifar10", network="lenet", formats=("smoothing",), methods=("exact",),
                       samples=3, seed=7, out=partial, progress=False)
    more = label_recovery.run(dataset="cifar10", network="lenet", formats=("smoothing",),
                              methods=("exact", "idlg"), samples=4, seed=7, out=partial, progress=False)
    assert more["new_rows"] == 1 + 4   # exact: only sample 3 is new; idlg: samples 0-3
    rows = _rows(partial / "samples.csv")
    assert len(rows) == len({(r["sample"], r["method"]) for r in rows}) == 8


def test_head_only_methods_answer_a_task_in_one_call_as_single_calls_would(monkeypatch):
    import gradleak

    setting = dict(dataset="cifar10", network="lenet", weights="untrained", seed=3, image_size=None, init=None)
    env = common.shared_setup(**setting)
    trials = [t for f in ("smoothing", "mixup") for t in common.draw_trials(env.labels, env.num_classes, f, 3, 3)]
    methods = ["exact-head", "idlg", "exact-auto"]
    calls = []
    batched = gradleak.recover_labels
    monkeypatch.setattr(gradleak, "recover_labels", lambda *a, **k: calls.append(len(a[0])) or batched(*a, **k))
    rows = label_recovery.attack_trials([(trial, methods) for trial in trials], setting=setting)
    assert calls == [3, 3, 3, 3]   # per head-only method and format, one call for the task's trials
    assert [(r["sample"], r["format"], r["method"]) for r in rows] == \
        [(t.sample, t.label_format, m) for t in trials for m in methods]
    for row, (trial, method) in zip(rows, [(t, m) for t in trials for m in methods]):
        truth = common.victim(env.model, env.images, trial)
        single = common.attack(method, env.model, truth.gradients, trial.label_format)
        graded = common.grade(single, truth)
        for column in ("success", "label_error", "feature_cos"):
            assert repr(row[column]) == repr(graded[column]), (method, column)   # the same bits (nan included)
        assert (row["pred_eps"], row["determined"], row["message"]) == \
            (single.pred_eps, single.determined, single.message)


def test_attack_heads_fails_only_the_victim_it_cannot_read():
    env = common.shared_setup(dataset="cifar10", network="lenet", weights="untrained", seed=3)
    trials = common.draw_trials(env.labels, env.num_classes, "smoothing", 3, 3)
    heads = [common.head_entries(env.model, common.victim(env.model, env.images, t).gradients) for t in trials]
    heads[1] = dict(heads[1], **{"head.weight": torch.zeros_like(heads[1]["head.weight"])})
    attempts = common.attack_heads("exact-head", env.model, heads, "smoothing")
    assert attempts[1].label is None and "all zeros" in attempts[1].message
    assert all(a.label is not None and a.determined for a in (attempts[0], attempts[2]))
    with pytest.raises(ValueError, match="not the exact search on the head alone"):
        common.attack_heads("exact", env.model, heads, "smoothing")


def test_noise_at_zero_equals_clean_run(quick_run, tmp_path):
    out, _ = quick_run
    clean = {(r["sample"], r["method"]): float(r["label_error"]) for r in _rows(out / "samples.csv")
             if r["format"] == "smoothing"}
    result = noise.run(dataset="cifar10", network="lenet", formats=("smoothing",), methods=("exact", "exact-head"),
                       stds=(0.0, 1e-3), noises=("gaussian", "laplace"), quick=True, seed=7, out=tmp_path,
                       progress=False, samples=label_recovery.QUICK_SAMPLES)
    rows = _rows(tmp_path / "noise.csv")
    zero = [r for r in rows if float(r["std"]) == 0.0]
    assert len(zero) == 2 * 2 * label_recovery.QUICK_SAMPLES
    for r in zero:
        assert float(r["label_error"]) == clean[(r["sample"], r["method"])]
        assert float(r["sigma"]) == 0.0
    noisy = [r for r in rows if float(r["std"]) > 0]
    assert all(float(r["sigma"]) > 0 for r in noisy)
    assert (tmp_path / "noise.png").stat().st_size > 0 and (tmp_path / "noise_summary.csv").exists()
    lines = (tmp_path / "noise_summary.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| dataset |"))
    assert lines[header].endswith("| std | n | exact | exact-head |")
    assert len(lines) - header - 2 == 2 * 2   # one row per (noise, std), the methods side by side
    assert {s["std"] for s in result["summary"]} == {0.0, 1e-3}


def test_add_noise_statistics():
    grads = {"a": torch.zeros(200, 100), "b": torch.zeros(20000)}
    for kind in noise.NOISE_KINDS:
        noisy = noise.add_noise(grads, kind, 0.5, torch.Generator().manual_seed(0))
        values = torch.cat([g.flatten() for g in noisy.values()]).double()
        assert abs(float(values.std()) - 0.5) < 0.01 and abs(float(values.mean())) < 0.01
        assert noisy["a"].dtype == torch.float32
    with pytest.raises(ValueError, match="noise"):
        noise.add_noise(grads, "uniform", 0.1, torch.Generator())


def test_landscape_quick(tmp_path):
    result = landscape.run(dataset="cifar10", network="lenet", quick=True, out=tmp_path, progress=False)
    rows = _rows(tmp_path / "landscape.csv")
    assert list(rows[0]) == landscape.FIELDS
    assert {r["panel"] for r in rows} == {"full", "zoom"}
    (summary,) = result["summary"]
    # untrained LeNet: one clean basin at the true scalar, for the paper's loss and for our residual
    assert abs(summary["paper_argmin_t"] - summary["true_t"]) < 0.05 * abs(summary["true_t"])
    assert abs(summary["ours_argmin_t"] - summary["true_t"]) < 0.05 * abs(summary["true_t"])
    # the CSV's free class is the one the switches report, and t is lambda times one constant
    switches = [i for i in range(1, len(rows)) if rows[i]["panel"] == rows[i - 1]["panel"] == "full"
                and rows[i]["free_class"] != rows[i - 1]["free_class"]]
    assert len(switches) == len(summary["switches"])
    ratios = [float(r["t"]) / float(r["lambda"]) for r in rows]
    assert max(ratios) - min(ratios) < 1e-12 * abs(ratios[0])
    assert (tmp_path / "landscape.png").stat().st_size > 0
    assert "true t" in (tmp_path / "landscape.md").read_text()


def test_registry_and_clear_errors(tmp_path):
    assert set(EXPERIMENTS) == {"label-recovery", "noise", "landscape", "train", "reconstruction", "report", "dp",
                                "local-steps", "label-variants", "batch"}
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope")
    with pytest.raises(ValueError, match="unknown method"):
        run_experiment("label-recovery", methods=("exact", "magic"), out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown label format"):
        run_experiment("label-recovery", formats=("cutmix",), out=tmp_path, progress=False)
    result = run_experiment("label-recovery", dataset="cifar10", network="lenet", samples=2, seed=1, out=tmp_path,
                            quick=True, weights="untrained", progress=False)
    assert math.isclose(sum(s["n"] for s in result["summary"]), 2 * 2 * len(label_recovery.DEFAULT_METHODS))


def test_wilson_interval():
    low, high = common.wilson_interval(50, 50)
    assert high == 1.0 and 0.92 < low < 0.93
    low, high = common.wilson_interval(0, 10)
    assert low == 0.0 and 0.27 < high < 0.28


def test_report_tabulates_every_run(quick_run, tmp_path):
    from gradleak.experiments import report

    with pytest.raises(ValueError, match="no label-recovery"):
        report.run(out=tmp_path)
    root = tmp_path / "results"
    shutil.copytree(quick_run[0], root / "run")
    table = report.run(out=root)
    lines = table.splitlines()
    assert lines[0].startswith("| dataset | network | weights | format | n | exact |")
    assert len(lines) == 2 + 3  # header, rule, one row per format
    assert (root / "label_recovery.md").read_text().strip() == table
