"""Float32 and float64 gradients of the same batches, side by side: what ``gradleak.recover_batch`` recovers from each.

The batches are the batch experiment's (``gradleak experiment batch``, :mod:`gradleak.experiments.batch`): the same
network, images, labels, eps and mixing weights, from the same per-batch seeds, so the float32 column is that
experiment's gradleak rows. The float64 column is the same network cast to float64, its inputs and targets built in
float64 (a target rounded to float32 sums to one only to float32's rounding, which a float64 gradient shows). Both
are graded by the experiment's evaluator: the examples (every label within 1e-3, every feature at cosine > 0.999),
determined, and confident wrong answers. Prints a table and writes a CSV.

    python benchmarks/bench_batch_dtype.py --network fcn4 --batch-sizes 2 4 8 --samples 5
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from gradleak.data import DATASETS, load_samples
from gradleak.experiments.batch import (BATCH_FORMATS, add_batch_options, attack, batch_rng, grade, victim_batch,
                                       victim_model)
from gradleak.experiments.common import write_rows

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_batch_options(parser, network="lenet", batch_sizes=[2, 4, 8])
    parser.add_argument("--weights", default="untrained", help="a checkpoint with a head bias, or untrained")
    parser.add_argument("--formats", nargs="+", default=list(BATCH_FORMATS), choices=BATCH_FORMATS)
    parser.add_argument("--out", default="bench-batch-dtype.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, side, _ = victim_model(args.dataset, args.network, args.weights, args.init, args.seed)
    models = {name: copy.deepcopy(model).to(dtype) for name, dtype in DTYPES.items()}
    images, labels = load_samples(args.dataset, size=side)
    num_classes = DATASETS[args.dataset].num_classes
    cells = [(f, b, s) for f in args.formats for b in args.batch_sizes for s in range(args.samples)]
    rows = []
    for label_format, size, sample in tqdm(cells, desc=f"{args.network} float32 / float64"):
        for name, network in models.items():
            gradients, truth = victim_batch(network, images, labels, num_classes, label_format, size,
                                            batch_rng(args.seed, label_format, size, sample))
            start = time.perf_counter()
            answer = attack("gradleak", network, gradients, size, tuple(images.shape[1:]))
            seconds = time.perf_counter() - start
            graded = grade(answer, truth, size, counts_given=True)
            rows.append(dict(network=args.network, format=label_format, batch_size=size, sample=sample, dtype=name,
                             examples=graded["examples_success"] is True, determined=bool(graded["determined"]),
                             confident_wrong=graded["confident_wrong"] is True, seconds=seconds))
    write_rows(args.out, rows)
    print(f"\n{args.network} ({args.init if args.weights == 'untrained' else 'trained'}), {args.dataset}: "
          f"batches whose examples all came back / determined / confident wrong, {args.samples} per cell\n")
    header = f"{'format':12} {'B':>3} {'float32':>12} {'float64':>12} {'float32 s':>10} {'float64 s':>10}"
    print(header)
    print("-" * len(header))
    for label_format in args.formats:
        for size in args.batch_sizes:
            cell = [r for r in rows if r["format"] == label_format and r["batch_size"] == size]
            marks, times = [], []
            for name in DTYPES:
                mine = [r for r in cell if r["dtype"] == name]
                marks.append("/".join(str(sum(r[k] for r in mine)) for k in ("examples", "determined",
                                                                             "confident_wrong")))
                times.append(float(np.median([r["seconds"] for r in mine])))
            print(f"{label_format:12} {size:3d} {marks[0]:>12} {marks[1]:>12} {times[0]:10.2f} {times[1]:10.2f}")
    print(f"per-batch rows: {args.out}")


if __name__ == "__main__":
    main()
