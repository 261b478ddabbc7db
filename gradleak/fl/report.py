"""The audit's report: one self-contained HTML file, plus ``records.csv`` and ``summary.json``.

Built from the files alone (``gradleak audit report DIR`` rebuilds it): ``records.jsonl`` (the attacker's
conclusions), and when the run was simulated, ``truth.jsonl`` (what the clients really trained on) and
``config.json``. This is the only place the two are joined, on ``(round, client)``. Without a truth file (an
audit of a real federation) the report shows the conclusions unscored.

Scoring, per client update:

* **leaked**: one example (batch size 1), the answer determined, and its label within 1e-3 (max-abs) of the
  label the client trained on;
* **confident wrong**: determined, but wrong by 1e-3 or more, or the update was a batch (never acceptable);
* **undetermined**: the audit said it could not pin one example's label down (a batch, noise, clipping it could
  not undo, ...); **error**: the reply could not be read.

The HTML holds inline CSS and base64 PNG images (matplotlib's Agg canvas, PIL): no script, no network.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from PIL import Image

from .._json import strict_json
from ..data import DATASETS
from ..metrics import psnr, ssim, to_display
from .records import (CONFIG_FILE, RECORDS_FILE, TRUTH_FILE, AuditRecord, TruthRecord, load_records,
                      load_truth)

PathLike = Union[str, Path]

LEAK_TOLERANCE = 1e-3
OUTCOMES = ("leaked", "undetermined", "confident wrong", "error", "unscored")
#: thumbnails shown (the CSV lists every reconstruction's PSNR / SSIM)
THUMBNAILS = 12
#: rows of the per-update HTML table (the CSV holds them all)
TABLE_ROWS = 400
_THUMB_PIXELS = 72


@dataclass
class UpdateRow:
    """One client update: the attacker's conclusion beside the truth (truth fields None when there is none).

    Attributes:
        conclusion / truth: the label in words (format, classes, eps / lambda), e.g. "smoothing 3, eps 0.100".
        label_error: max-abs error of the recovered label (batch size 1 only).
        scale / true_scale: the recovered ``gradient_scale`` and ``-lr * local_steps * clip_factor``.
        outcome: one of :data:`OUTCOMES`.
        psnr, ssim: of the reconstruction against the client's input (batch size 1 only).
    """

    round: int
    client: int
    partition: Optional[int]
    augmentation: Optional[str]
    batch_size: Optional[int]
    clip: Optional[float]
    noise_std: Optional[float]
    error: Optional[str]
    determined: Optional[bool]
    conclusion: str
    truth: str
    label_error: Optional[float]
    batch_size_estimate: Optional[int]
    scale: Optional[float]
    scale_source: Optional[str]
    true_scale: Optional[float]
    outcome: str
    psnr: Optional[float]
    ssim: Optional[float]
    reconstruction: Optional[str]
    reconstruction_method: Optional[str]
    inputs: Optional[str]
    seconds: float
    message: str


# ------------------------------------------------------------------------------------------------ joining
def describe_label(label_format: Optional[str], classes: Optional[Sequence[int]], eps: Optional[float],
                   lam: Optional[float]) -> str:
    """A label in words: "hard 3", "smoothing 3, eps 0.100", "mixup 2+7, lam 0.310" (+ eps when smoothed)."""
    if label_format is None or not classes:
        return "-"
    if label_format == "mixup" and len(classes) == 2:
        text = f"mixup {classes[0]}+{classes[1]}, lam {lam:.3f}" if lam is not None else \
            f"mixup {classes[0]}+{classes[1]}"
        return text + (f", eps {eps:.3f}" if eps and eps > 5e-4 else "")
    if label_format == "smoothing" or (eps and eps > 5e-4):
        return f"smoothing {classes[0]}, eps {eps:.3f}"
    return f"hard {classes[0]}"


def label_structure(label: Sequence[float]) -> Tuple[str, List[int], float, Optional[float]]:
    """``(format, classes, eps, lam)`` of a true soft label, in the attacker's conventions: mixup classes
    ascending with ``lam`` the weight of the second."""
    y = np.asarray(label, dtype=np.float64)
    floor = float(y.min())
    above = np.flatnonzero(y > floor + 1e-6)
    eps = floor * len(y)
    if len(above) == 2:
        a, b = sorted(above.tolist())
        weight_a, weight_b = y[a] - floor, y[b] - floor
        return "mixup", [a, b], eps, float(weight_b / (weight_a + weight_b))
    top = int(np.argmax(y))
    return ("smoothing" if eps > 1e-6 else "hard"), [top], eps, None


def _truth_text(truth: TruthRecord) -> str:
    if truth.batch_size == 1:
        return describe_label(*label_structure(truth.labels[0]))
    classes = sorted(int(np.argmax(y)) for y in truth.labels)
    return f"batch of {truth.batch_size} (classes {', '.join(map(str, classes))})"


def _outcome(record: AuditRecord, truth: Optional[TruthRecord], error: Optional[float]) -> str:
    if record.error:
        return "error"
    if truth is None:
        return "unscored"
    if not record.determined:
        return "undetermined"
    return "leaked" if truth.batch_size == 1 and error is not None and error < LEAK_TOLERANCE else "confident wrong"


def _image_scores(folder: Path, record: AuditRecord, truth: Optional[TruthRecord],
                  stats: Tuple[Optional[Sequence[float]], Optional[Sequence[float]]]) -> Tuple[Optional[float], ...]:
    """PSNR and SSIM of a reconstruction against the client's one input (None where there is none, or where the
    image is too small for SSIM's window)."""
    if not (record.reconstruction and truth and truth.inputs and truth.batch_size == 1):
        return None, None
    pred = torch.from_numpy(np.load(folder / record.reconstruction)).double()
    true = torch.from_numpy(np.load(folder / truth.inputs)[0]).double()
    if pred.shape != true.shape:
        return None, None
    mean, std = stats
    quality = psnr(pred, true, mean=mean, std=std)
    try:
        similarity = ssim(pred, true, mean=mean, std=std)
    except ValueError:  # smaller than SSIM's 11-pixel window
        similarity = None
    return quality, similarity


def join(folder: PathLike, records: Sequence[AuditRecord], truths: Sequence[TruthRecord],
         stats: Tuple[Optional[Sequence[float]], Optional[Sequence[float]]] = (None, None)) -> List[UpdateRow]:
    """One :class:`UpdateRow` per record, joined with the truth of the same ``(round, client)``."""
    folder = Path(folder)
    by_key = {(t.round, t.client): t for t in truths}
    rows = []
    for record in records:
        truth = by_key.get((record.round, record.client))
        error = None
        if truth is not None and truth.batch_size == 1 and record.label is not None \
                and len(record.label) == len(truth.labels[0]):
            error = float(np.max(np.abs(np.asarray(record.label) - np.asarray(truth.labels[0]))))
        quality, similarity = _image_scores(folder, record, truth, stats)
        rows.append(UpdateRow(
            round=record.round, client=record.client, partition=truth.partition if truth else None,
            augmentation=truth.augmentation if truth else None, batch_size=truth.batch_size if truth else None,
            clip=truth.clip if truth else None, noise_std=truth.noise_std if truth else None, error=record.error,
            determined=record.determined,
            conclusion=describe_label(record.label_format, record.classes, record.eps, record.lam),
            truth=_truth_text(truth) if truth else "-", label_error=error,
            batch_size_estimate=record.batch_size_estimate, scale=record.gradient_scale,
            scale_source=record.scale_source,
            true_scale=-truth.lr * truth.local_steps * truth.clip_factor if truth else None,
            outcome=_outcome(record, truth, error), psnr=quality, ssim=similarity,
            reconstruction=record.reconstruction, reconstruction_method=record.reconstruction_method,
            inputs=truth.inputs if truth else None, seconds=record.seconds,
            message=record.error or record.message))
    return sorted(rows, key=lambda r: (r.round, r.partition if r.partition is not None else -1, r.client))


# ------------------------------------------------------------------------------------------------ summary
def _tally(rows: Sequence[UpdateRow]) -> Dict[str, object]:
    counts = {outcome: sum(r.outcome == outcome for r in rows) for outcome in OUTCOMES}
    return {"updates": len(rows), **counts, "leak_rate": counts["leaked"] / len(rows) if rows else None}


def _clipping(row: UpdateRow) -> str:
    if row.clip is None:
        return "off"
    return f"clip {row.clip:g}" + (f", noise std {row.noise_std:.3g}" if row.noise_std else "")


GROUPS = {
    "augmentation": lambda r: r.augmentation,
    "batch size": lambda r: r.batch_size,
    "clipping": _clipping,
    "round": lambda r: r.round,
}


def summarise(rows: Sequence[UpdateRow], config: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """The numbers of the report (``summary.json``): outcomes overall, for single-example updates, and split by
    augmentation, batch size, clipping and round; batches flagged; reconstruction quality; audit time."""
    scored = [r for r in rows if r.batch_size is not None]  # joined with a truth line
    single = [r for r in scored if r.batch_size == 1]
    batches = [r for r in scored if r.batch_size is not None and r.batch_size > 1]
    qualities = [r.psnr for r in rows if r.psnr is not None]
    summary: Dict[str, object] = {
        "updates": len(rows), "scored": bool(scored), "leak_tolerance": LEAK_TOLERANCE,
        "all": _tally(scored), "single_example": _tally(single), "batches": _tally(batches),
        "batches_flagged": sum(r.batch_size_estimate is not None and r.batch_size_estimate > 1 for r in batches),
        "determined": sum(bool(r.determined) for r in rows), "errors": sum(r.outcome == "error" for r in rows),
        "reconstructions": len(qualities),
        "median_psnr": float(np.median(qualities)) if qualities else None,
        "median_seconds": float(np.median([r.seconds for r in rows])) if rows else None,
    }
    if scored:
        summary["by"] = {name: {str(value): _tally([r for r in scored if key(r) == value])
                                for value in sorted({key(r) for r in scored}, key=str)}
                         for name, key in GROUPS.items()}
    if config:
        summary["config"] = {k: v for k, v in config.items() if k != "clients"}
    return summary


# ------------------------------------------------------------------------------------------------ figures
def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _panel(draw: Callable[[Axes], None], *, title: str, xlabel: str, ylabel: str) -> str:
    """One small report figure: ``draw(ax)`` fills it (legend included), then the labels; a base64 PNG."""
    figure = Figure(figsize=(4.2, 2.8))
    ax = figure.add_subplot()
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _png(figure)


def _leak_by_round(rows: Sequence[UpdateRow]) -> str:
    return _panel(lambda ax: _draw_leak_by_round(ax, rows), title="leak rate per round", xlabel="round",
                  ylabel="exact labels leaked (%)")


def _draw_leak_by_round(ax: Axes, rows: Sequence[UpdateRow]) -> None:
    rounds = sorted({r.round for r in rows})
    for label, subset in (("single-example updates", [r for r in rows if r.batch_size == 1]), ("all updates", rows)):
        rates = [np.mean([r.outcome == "leaked" for r in subset if r.round == k] or [np.nan]) * 100 for k in rounds]
        ax.plot(rounds, rates, marker="o", label=label)
    ax.set_ylim(-5, 105)
    ax.set_xticks(rounds)
    ax.legend(fontsize=8)


def _error_histogram(rows: Sequence[UpdateRow]) -> str:
    return _panel(lambda ax: _draw_error_histogram(ax, rows), title="label error",
                  xlabel="log10 max label error (batch size 1)", ylabel="updates")


def _draw_error_histogram(ax: Axes, rows: Sequence[UpdateRow]) -> None:
    errors = [(max(r.label_error, 1e-12), bool(r.determined)) for r in rows if r.label_error is not None]
    bins = np.linspace(-12, 0.5, 26)
    for determined, colour in ((True, "tab:green"), (False, "tab:gray")):
        values = [math.log10(e) for e, d in errors if d == determined]
        ax.hist(values, bins=bins, color=colour, alpha=0.8, label="determined" if determined else "undetermined")
    ax.axvline(math.log10(LEAK_TOLERANCE), color="tab:red", linestyle="--", label="1e-3")
    ax.legend(fontsize=8)


def _scale_plot(rows: Sequence[UpdateRow]) -> str:
    return _panel(lambda ax: _draw_scales(ax, rows), title="update scale",
                  xlabel="true |scale| = lr x steps x clip factor", ylabel="|scale| the audit used")


def _draw_scales(ax: Axes, rows: Sequence[UpdateRow]) -> None:
    points = [r for r in rows if r.scale and r.true_scale and r.batch_size == 1]
    for source, marker in (("config", "o"), ("recovered", "^")):
        chosen = [r for r in points if r.scale_source == source]
        for determined, face in ((True, None), (False, "none")):
            subset = [r for r in chosen if bool(r.determined) == determined]
            if subset:
                ax.scatter([abs(r.true_scale) for r in subset], [abs(r.scale) for r in subset], marker=marker,
                           facecolors=face, edgecolors="tab:blue" if source == "config" else "tab:orange",
                           label=f"{'lr from config' if source == 'config' else 'recovered'}"
                                 f"{'' if determined else ', undetermined'}")
    if points:
        span = [min(abs(r.true_scale) for r in points) / 2, max(abs(r.true_scale) for r in points) * 2]
        ax.plot(span, span, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for axis in (ax.xaxis, ax.yaxis):  # ticks at 1, 2, 5 x 10^k, written plainly: log minor labels collide
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize=7)


def _thumbnail(array: np.ndarray, stats) -> str:
    image = to_display(torch.from_numpy(array).double(), *stats)
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    factor = max(1, _THUMB_PIXELS // max(picture.size))
    picture = picture.resize((picture.size[0] * factor, picture.size[1] * factor), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ------------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d8dce3}
p,li{font-size:13.5px;line-height:1.45}table{border-collapse:collapse;font-size:12.5px;margin:6px 0}
th,td{border:1px solid #d8dce3;padding:3px 7px;text-align:left;vertical-align:top}th{background:#eef1f6}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.leaked{background:#ffe1dc}.wrong{background:#ffb3a7}.undetermined{background:#eef6ee}.error{background:#fff1c2}
.headline{font-size:15px}
.figs img{margin:4px 10px 4px 0;border:1px solid #e3e6eb}.thumbs{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;font-size:11.5px;text-align:center}figure img{image-rendering:pixelated;margin:1px}
.cfg td:first-child{font-weight:600}.muted{color:#5b6478}td.note{min-width:220px;font-size:11.5px}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _number(value: Optional[float], fmt: str = ".3g") -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, fmt)


def _rate(tally: Dict[str, object]) -> str:
    rate = tally.get("leak_rate")
    return "-" if rate is None else f"{100 * rate:.1f} %"


def _config_section(config: Optional[Dict[str, object]]) -> str:
    if not config:
        return ("<p class='muted'>No config.json: these records come from a LeakageAudit wrapped around a real "
                "strategy; the clients' settings are unknown to the server.</p>")
    clients = config.get("clients", [])

    def kinds(key: str) -> str:
        return ", ".join(sorted({"none" if c[key] is None else str(c[key]) for c in clients}))

    rows = [("dataset", f"{config['dataset']} at {config['image_size']} px ({config['dataset_size']} bundled images"
                        + (f", repeated {config['copies']}x: clients share images" if config["copies"] > 1 else "")
                        + ")"),
            ("network", config["network"]), ("clients", f"{config['num_clients']} ({config['partitioning']}"
                                                        + (f", alpha {config['dirichlet_alpha']}"
                                                           if config["partitioning"] == "dirichlet" else "") + ")"),
            ("rounds", config["rounds"]), ("local training", f"{config['local_steps']} plain SGD step(s), lr "
                                                             f"{config['lr']}"),
            ("augmentations", f"{kinds('augmentation')} (smoothing eps {config['eps']}, mixup alpha "
                              f"{config['mixup_alpha']})"),
            ("batch sizes", kinds("batch_size")), ("clipping norms", kinds("clip") + " (Flower's fixedclipping_mod)"),
            ("local DP noise", f"multiplier {config['noise']} (Flower's LocalDpMod)" if config["noise"] else "none"),
            ("the server knows", "the lr (train config)" if config["server_knows_lr"] else
             "nothing of the lr (the scale is recovered)")]
    return "<table class='cfg'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


_THREAT_MODEL = (
    "<p>An honest-but-curious server: it aggregates as the wrapped strategy says (the audit never changes what is "
    "aggregated) and reads every update it receives. It sees the global weights it sent, the weights each client "
    "sent back, the train config it set, and the reply's node id. It does not see the clients' data, labels, "
    "augmentation, batch size, clipping or noise. The attacker's conclusions (<code>records.jsonl</code>) were "
    "written from that alone; the clients' own truth (<code>truth.jsonl</code>) is read only here, to score them. "
    "Leaked means: one example's update, a determined answer, and its label within 1e-3 of the true soft label.</p>")


def _summary_table(summary: Dict[str, object]) -> str:
    head = ('<table id="summary"><tr><th>split</th><th>setting</th><th>updates</th><th>leaked</th>'
            "<th>undetermined</th><th>confident wrong</th><th>errors</th><th>leak rate</th></tr>")
    lines = []

    def line(split: str, setting: str, tally: Dict[str, object]) -> None:
        lines.append(f"<tr><td>{_e(split)}</td><td>{_e(setting)}</td>" + "".join(
            f"<td class='n'>{tally[k]}</td>" for k in ("updates", "leaked", "undetermined", "confident wrong",
                                                       "error")) + f"<td class='n'>{_rate(tally)}</td></tr>")

    line("all", "every update", summary["all"])
    line("all", "one example (batch size 1)", summary["single_example"])
    if summary["batches"]["updates"]:
        line("all", "batches (batch size > 1)", summary["batches"])
    for split, groups in summary.get("by", {}).items():
        if split != "round":
            for setting, tally in groups.items():
                line(split, setting, tally)
    return head + "".join(lines) + "</table>"


def _updates_table(rows: Sequence[UpdateRow]) -> str:
    css = {"leaked": "leaked", "confident wrong": "wrong", "undetermined": "undetermined", "error": "error"}
    out = ["<p>What the server concluded beside what the client trained on. Client: the simulated client's partition "
           "(its node id, which records.jsonl and truth.jsonl share, is in the tooltip and records.csv). True scale: "
           "-lr x local steps x the clip factor of the client's clipping mod.</p>",
           '<table id="updates"><tr><th>round</th><th>client</th><th>recipe (truth)</th><th>true label</th>'
           "<th>attacker's conclusion</th><th>determined</th><th>label error</th><th>apparent batch</th>"
           "<th>scale (source)</th><th>true scale</th><th>outcome</th><th>note</th></tr>"]
    for r in rows[:TABLE_ROWS]:
        recipe = "-" if r.batch_size is None else f"{r.augmentation}, B={r.batch_size}, {_clipping(r)}"
        cells = [
            f"<td class='n'>{r.round}</td>",
            f"<td title='node {r.client}'>{r.partition if r.partition is not None else f'node {r.client}'}</td>",
            f"<td>{_e(recipe)}</td><td>{_e(r.truth)}</td><td>{_e(r.conclusion)}</td>",
            f"<td>{_e('-' if r.determined is None else r.determined)}</td>",
            f"<td class='n'>{_number(r.label_error, '.1e')}</td>",
            f"<td class='n'>{_e('-' if r.batch_size_estimate is None else r.batch_size_estimate)}</td>",
            f"<td class='n'>{'-' if r.scale is None else f'{r.scale:.4g} ({_e(r.scale_source)})'}</td>",
            f"<td class='n'>{_number(r.true_scale, '.4g')}</td><td>{_e(r.outcome)}</td>",
            f"<td class='muted note'>{_e(r.message[:160])}</td>"]
        out.append(f"<tr class='{css.get(r.outcome, '')}'>{''.join(cells)}</tr>")
    out.append("</table>")
    if len(rows) > TABLE_ROWS:
        out.append(f"<p class='muted'>The first {TABLE_ROWS} of {len(rows)} updates; records.csv lists them all.</p>")
    return "".join(out)


def _thumbnails(folder: Path, rows: Sequence[UpdateRow], stats) -> str:
    shown = [r for r in rows if r.reconstruction and r.inputs and r.batch_size == 1][:THUMBNAILS]
    if not shown:
        return ("<p class='muted'>No reconstructions: the network is not fully connected (gradient matching is off "
                "by default), or no answer was determined.</p>")
    cells = []
    for r in shown:
        truth = _thumbnail(np.load(folder / r.inputs)[0], stats)
        guess = _thumbnail(np.load(folder / r.reconstruction), stats)
        quality = "PSNR -" if r.psnr is None else f"PSNR {_number(r.psnr, '.1f')} dB"
        similarity = "" if r.ssim is None else f", SSIM {r.ssim:.3f}"
        cells.append(f"<figure><img alt='client input' src='data:image/png;base64,{truth}'>"
                     f"<img alt='reconstruction' src='data:image/png;base64,{guess}'><figcaption>round {r.round}, "
                     f"client {_e(r.partition)}<br>{quality}{similarity}</figcaption></figure>")
    how = {"analytic": "analytic inversion of the fully connected layers, from the recovered label and feature",
           "matching": "gradient matching with the recovered label"}
    methods = "; ".join(how[m] for m in sorted({r.reconstruction_method for r in shown}) if m in how)
    return (f"<p>Left: the client's input; right: what the server rebuilt from the update alone ({methods}).</p>"
            "<div class='thumbs'>"
            + "".join(cells) + "</div>")


def render_html(folder: PathLike, rows: Sequence[UpdateRow], summary: Dict[str, object],
                config: Optional[Dict[str, object]], stats) -> str:
    """The report as one HTML string (inline CSS and images)."""
    folder = Path(folder)
    if summary["scored"]:
        single = summary["single_example"]
        headline = (f"<p class='headline'><b>{single['leaked']} of {single['updates']}</b> single-example updates "
                    f"gave away their exact label ({_rate(single)}); confident wrong answers: "
                    f"<b>{summary['all']['confident wrong']}</b>; batches flagged as batches: "
                    f"{summary['batches_flagged']} of {summary['batches']['updates']}; unreadable replies: "
                    f"{summary['errors']}.</p>")
        figures = ("<div class='figs'>" + "".join(f"<img alt='{name}' src='data:image/png;base64,{data}'>"
                                                  for name, data in (("leak rate per round", _leak_by_round(rows)),
                                                                     ("label error", _error_histogram(rows)),
                                                                     ("scale", _scale_plot(rows)))) + "</div>")
        summary_block = _summary_table(summary)
    else:
        headline = (f"<p class='headline'>{summary['determined']} of {summary['updates']} updates gave the server a "
                    f"determined label; unreadable replies: {summary['errors']}. (No truth.jsonl: unscored.)</p>")
        figures = ""
        summary_block = ('<table id="summary"><tr><th>updates</th><th>determined</th><th>errors</th></tr><tr>'
                         f"<td class='n'>{summary['updates']}</td><td class='n'>{summary['determined']}</td>"
                         f"<td class='n'>{summary['errors']}</td></tr></table>")
    timing = "" if summary["median_seconds"] is None else \
        f"<p class='muted'>The audit took {1000 * summary['median_seconds']:.0f} ms per update (median).</p>"
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>gradleak audit report</title>"
            f"<style>{_CSS}</style></head><body><h1>gradleak audit: what the server learns from each client update"
            f"</h1>{headline}<h2>Configuration</h2>{_config_section(config)}<h2>Threat model</h2>{_THREAT_MODEL}"
            f"<h2>Summary</h2>{summary_block}{timing}{figures}<h2>Reconstructions</h2>"
            f"{_thumbnails(folder, rows, stats)}<h2>Every update</h2>{_updates_table(rows)}</body></html>")


# ------------------------------------------------------------------------------------------------ files
@dataclass(frozen=True)
class ReportFiles:
    """Paths of what :func:`write_report` wrote, and the summary."""

    html: Path
    csv: Path
    json: Path
    summary: Dict[str, object]


def _normalisation(config: Optional[Dict[str, object]]):
    """The dataset's mean / std that normalised the inputs (None / None when unknown: shown as they are)."""
    if config and config.get("dataset") in DATASETS:
        info = DATASETS[config["dataset"]]
        return info.mean, info.std
    return None, None


def write_report(folder: PathLike) -> ReportFiles:
    """Rebuild ``report.html``, ``records.csv`` and ``summary.json`` in ``folder`` from its files.

    Raises:
        FileNotFoundError: ``folder`` has no ``records.jsonl``.
    """
    folder = Path(folder)
    if not (folder / RECORDS_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {RECORDS_FILE}: not an audit folder (gradleak audit --out DIR, "
                                "or LeakageAudit(..., out=DIR))")
    config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else None
    truths = load_truth(folder / TRUTH_FILE) if (folder / TRUTH_FILE).is_file() else []
    stats = _normalisation(config)
    rows = join(folder, load_records(folder / RECORDS_FILE), truths, stats)
    summary = summarise(rows, config)
    paths = ReportFiles(folder / "report.html", folder / "records.csv", folder / "summary.json", summary)
    paths.html.write_text(render_html(folder, rows, summary, config, stats), encoding="utf-8")
    with open(paths.csv, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=[f.name for f in dataclasses.fields(UpdateRow)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    paths.json.write_text(json.dumps(strict_json(summary), indent=1, default=str, allow_nan=False))
    return paths
