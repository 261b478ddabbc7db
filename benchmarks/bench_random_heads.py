"""Random single-example heads judged against the truth: how often an answer is determined, and how often a
determined answer is wrong, regime by regime.

The paper's networks give well-behaved softmaxes; this draws heads nobody tuned, to look for confident wrong answers
where the fit test could be fooled: few classes (3 to 5, where the general structures have no equation to spare),
saturated softmaxes (logits up to 30 times larger than a default init's: one class holds the whole prediction) and
nearly linear ones (logits 100 times smaller: eps trades against the gradient's scale), float32 and float64, a head
bias or not, a known or an unknown gradient scale (a weight delta ``-lr * g``), the label format told or detected.
Each case draws a head ``W`` (C, d), a feature ``h`` (ReLU or signed), a label (hard; smoothed with eps ~
10^U(-3, -0.5); a mixup of two classes with lam ~ U(0.02, 0.98); or a smoothed mixup) and recovers it from
``outer(softmax(W h + b) - y, h)`` with :func:`gradleak.recover_label`. The evaluator alone sees the truth: a
determined answer is wrong when a label entry is more than 1e-3 off or the feature's cosine is below 0.999.
Prints a table and writes a CSV.

    python benchmarks/bench_random_heads.py --cases 6000
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List

import torch
from tqdm.auto import tqdm

import gradleak
from gradleak.experiments.common import markdown_table, write_rows

CLASSES = (3, 4, 5, 10, 10, 10, 20, 100)
DIMS = (8, 64, 256)
KINDS = ("hard", "smoothing", "mixup", "smoothed mixup")


def draw_case(generator: torch.Generator) -> Dict[str, object]:
    """One random head, feature, label and observation (the truth kept under ``label`` and ``feature``)."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=generator))]

    num_classes, dim, kind = pick(CLASSES), pick(DIMS), pick(KINDS)
    dtype, bias, scale = pick((torch.float32, torch.float64)), pick((False, True)), pick(("known", "known", "unknown"))
    told, relu, logit_scale = pick((False, True)), pick((True, True, False)), 10 ** uniform(-2, 1.5)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64) * logit_scale * 4 / dim ** 0.5
    head_bias = torch.randn(num_classes, generator=generator, dtype=torch.float64) * 0.3
    feature = torch.randn(dim, generator=generator, dtype=torch.float64)
    feature = torch.relu(feature) if relu else feature
    first, second = torch.randperm(num_classes, generator=generator)[:2].tolist()
    eps, lam = 10 ** uniform(-3, -0.5), uniform(0.02, 0.98)
    label = torch.zeros(num_classes, dtype=torch.float64)
    if kind in ("hard", "smoothing"):
        label[first] = 1.0
    else:
        label[first], label[second] = lam, 1 - lam
    if kind in ("smoothing", "smoothed mixup"):
        label = label * (1 - eps) + eps / num_classes
    errors = torch.softmax(weight @ feature + (head_bias if bias else 0), -1) - label
    factor = -uniform(0.001, 1.0) if scale == "unknown" else 1.0
    options = dict(label_format=({"smoothed mixup": "mixup"}.get(kind, kind) if told else "auto"),
                   gradient_scale=scale)
    if bias:
        options.update(bias=head_bias.to(dtype), bias_grad=(factor * errors).to(dtype))
    return dict(classes=num_classes, dim=dim, dtype=str(dtype).replace("torch.", ""), kind=kind,
                logit_scale=logit_scale, head_bias=bias, gradient_scale=scale, told=told, relu=relu,
                weight_grad=(factor * torch.outer(errors, feature)).to(dtype), weight=weight.to(dtype),
                options=options, label=label, feature=feature)


def judge(case: Dict[str, object]) -> Dict[str, object]:
    """Recover one case and grade the answer against its truth."""
    row = {key: case[key] for key in ("classes", "dim", "dtype", "kind", "logit_scale", "head_bias",
                                      "gradient_scale", "told", "relu")}
    try:
        result = gradleak.recover_label(case["weight_grad"], case["weight"], **case["options"])
    except ValueError as error:  # refused outright (e.g. too few classes for the format and scale)
        return dict(row, refused=True, determined=False, label_error=math.nan, feature_cosine=math.nan,
                    wrong=False, message=str(error))
    label_error = float((result.label.double() - case["label"]).abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(result.feature.double(), case["feature"], dim=0))
    return dict(row, refused=False, determined=result.determined, label_error=label_error, feature_cosine=cosine,
                wrong=result.determined and (label_error > 1e-3 or cosine < 0.999), message=result.message)


def regime(row: Dict[str, object]) -> str:
    """The softmax's regime: nearly linear, saturated, or between."""
    return "nearly linear (logit scale < 0.1)" if row["logit_scale"] < 0.1 else \
        "saturated (logit scale > 5)" if row["logit_scale"] > 5 else "between"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="bench-random-heads.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    rows = [judge(draw_case(generator)) for _ in tqdm(range(args.cases), desc="random heads")]
    write_rows(args.out, rows)
    groups: List[tuple] = [("all", lambda r: True)]
    groups += [(f"{low}-{high} classes", lambda r, low=low, high=high: low <= r["classes"] <= high)
               for low, high in ((3, 5), (10, 100))]
    groups += [(name, lambda r, name=name: regime(r) == name)
               for name in ("nearly linear (logit scale < 0.1)", "between", "saturated (logit scale > 5)")]
    groups += [(f"scale {scale}", lambda r, scale=scale: r["gradient_scale"] == scale) for scale in ("known", "unknown")]
    groups += [("format told", lambda r: r["told"]), ("format detected", lambda r: not r["told"])]
    groups += [(dtype, lambda r, dtype=dtype: r["dtype"] == dtype) for dtype in ("float32", "float64")]
    table = []
    for name, member in groups:
        cell = [r for r in rows if member(r)]
        table.append([name, len(cell), sum(r["refused"] for r in cell), sum(r["determined"] for r in cell),
                      sum(r["wrong"] for r in cell)])
    print(f"\n{args.cases} random heads (seed {args.seed})\n")
    print(markdown_table(["cases", "n", "refused", "determined", "determined and wrong"], table))
    print(f"per-case rows: {args.out}")


if __name__ == "__main__":
    main()
