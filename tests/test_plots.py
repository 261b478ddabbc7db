"""The figures: every method's curve stays visible, the true scalar is in every legend, the landscape is drawn in t,
and the residual's jumps are where (and as large as) the landscape module says."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

import gradleak
from gradleak import plots
from gradleak.experiments import landscape, noise
from gradleak.head import factor_head
from gradleak.recovery.paper import paper_objective


def _legend_texts(ax):
    legend = ax.get_legend()
    assert legend is not None, ax.get_title()
    return [text.get_text() for text in legend.get_texts()]


def test_curve_styles_tell_every_curve_apart():
    names = [f"method {i}" for i in range(12)]
    styles = plots.curve_styles(names + names[:3])      # repeated names keep their first style
    assert list(styles) == names
    assert len({(s["marker"], s["linestyle"]) for s in styles.values()}) == 12
    assert len({s["color"] for s in styles.values()}) == 10
    assert all(s["markerfacecolor"] == "none" and s["label"] == name for name, s in styles.items())
    sizes = [s["markersize"] for s in styles.values()]
    assert sizes == sorted(sizes, reverse=True)         # each hollow marker rings the next one drawn over it
    with pytest.raises(ValueError, match="at most 12"):
        plots.curve_styles(names + ["one more"])


def _noise_summary(methods, stds=(0.0, 1e-3, 1e-1)):
    """Every method with the same numbers: the curves coincide exactly, the worst case for telling them apart."""
    return [{"dataset": "cifar10", "network": "lenet", "weights": "untrained", "format": label_format,
             "noise": kind, "scale": "relative", "std": std, "method": method, "accuracy": 1.0 - std,
             "median_label_error": 1e-7 + std}
            for label_format in ("smoothing", "mixup") for kind in ("gaussian", "laplace") for method in methods
            for std in stds]


def test_noise_figure_keeps_coinciding_methods_visible(tmp_path):
    methods = ["exact", "lbfgs", "pso", "exact-head"]
    open_before = plt.get_fignums()
    figure = noise.draw(_noise_summary(methods))
    assert plt.get_fignums() == open_before             # not registered with pyplot: nothing to leak
    axes = figure.get_axes()
    assert len(axes) == 4 * 2
    style_of = {}
    for ax in axes:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == methods
        assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == len(methods)
        for line in lines:  # one method, one look, in every panel
            look = (line.get_marker(), line.get_linestyle(), line.get_color(), line.get_markersize())
            assert style_of.setdefault(line.get_label(), look) == look
        assert _legend_texts(ax) == methods
        assert ax.get_xscale() == "log"
        assert ax.get_xticklabels()[0].get_text() == "0"   # std 0, drawn a decade left of the smallest std
    assert noise.plot(_noise_summary(methods), tmp_path / "noise.png").stat().st_size > 0


def _random_landscape(seed: int, points: int = 4000):
    """What :func:`landscape.landscape` returns, for a random bias-free head and a smoothed label (no data set)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(10, 32, generator=generator, dtype=torch.float64)
    feature = torch.randn(32, generator=generator, dtype=torch.float64).relu()
    label = gradleak.smooth_label(3, 10, 0.3, dtype=torch.float64)
    problem = factor_head(torch.outer(torch.softmax(weight @ feature, -1) - label, feature), weight)
    objective = paper_objective(problem, "smoothing", coefficient=1.0)
    true_t = float(feature @ problem.v) / problem.sigma
    true_lambda = objective.from_t(true_t)
    sign = 1.0 if true_lambda > 0 else -1.0
    full = landscape.curves_at(problem, objective,
                               sign * torch.linspace(0.05, 4 * abs(true_lambda), points, dtype=torch.float64))
    return problem, objective, {"weights": f"random head {seed}", "true_t": true_t, "true_lambda": true_lambda,
                                "eps": 0.3, "target": 3, "full": full, "zoom_centre": true_t,
                                "switches": landscape.free_class_switches(problem, full)}


def test_residual_jumps_by_the_normaliser_ratio_where_the_free_class_changes():
    for seed in range(3):
        _, _, result = _random_landscape(seed, points=100_000)
        curves, switches = result["full"], result["switches"]
        changed = (curves["free_class"][1:] != curves["free_class"][:-1]).nonzero().flatten().tolist()
        assert changed and len(changed) == len(switches)
        residual, loss = curves["residual"], curves["paper_loss"]
        for i, switch in zip(changed, switches):
            assert float(curves["t"][i]) < switch["t"] < float(curves["t"][i + 1]) or \
                float(curves["t"][i]) > switch["t"] > float(curves["t"][i + 1])
            # the residual jumps by exactly the ratio of the two normalisers ...
            assert float(residual[i + 1] / residual[i]) == pytest.approx(switch["jump"], rel=1e-3)
            # ... while the paper's loss only kinks: its step there is no larger than its neighbours'
            assert abs(float(loss[i + 1] - loss[i])) < 3 * abs(float(loss[i] - loss[i - 1])) + 1e-12


def test_landscape_figure_in_t_with_the_truth_in_every_legend(tmp_path):
    problem, objective, result = _random_landscape(0)
    # a zoom that misses the truth: its legend must still name it
    result["zoom"] = landscape.curves_at(problem, objective, torch.linspace(
        objective.from_t(1.5 * result["true_t"]), objective.from_t(1.6 * result["true_t"]), 50, dtype=torch.float64))
    (visible,) = result["switches"]
    assert abs(visible["jump"] - 1) > landscape.MARKED_JUMP - 1
    faint = {"t": (float(result["full"]["t"][10]) + float(result["full"]["t"][11])) / 2, "before": 1, "after": 2,
             "jump": 1.001}
    result["switches"] = [visible, faint]
    figure = landscape.draw([result, result], "random heads")
    axes = figure.get_axes()
    assert len(axes) == 2 * 3
    for index, ax in enumerate(axes):
        assert ax.get_xlabel() == "t"
        truth = [text for text in _legend_texts(ax) if text.startswith("true t = ")]
        assert len(truth) == 1
        panel = index % 3
        assert ("off this range" in truth[0]) == (panel == 1)
        vertical = {float(line.get_xdata()[0]) for line in ax.get_lines() if len(set(line.get_xdata())) == 1}
        assert (result["true_t"] in vertical) == (panel != 1)
        # the switch that moves the residual by about half is marked, the one that moves it by 0.1 % is not
        assert (visible["t"] in vertical) == (panel != 1)
        assert faint["t"] not in vertical
    assert landscape.plot([result], tmp_path / "landscape.png", "random head").stat().st_size > 0
