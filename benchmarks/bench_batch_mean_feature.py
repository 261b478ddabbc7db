"""Where a smoothed batch's eps goes wrong: the summed predictions, estimated three ways on the same gradients.

A batch's class mass is ``S_p - B dL/db`` with ``S_p`` the summed predictions, which the batch hides.
``recover_batch`` estimates ``S_p`` with each class's examples at their class mean, and the class means follow from
the head's gradient once the batch's mean feature is known (:func:`gradleak.batch.mass.class_mean_logits`); the
mean feature itself is estimated from the head's gradient too (:func:`gradleak.batch.mass.mean_feature`, over the
classes no example holds, or every class when each holds one). This benchmark takes the evaluator's view: it reads
the batch's true features and counts, holds the counts, and fits eps by least squares (the lattice fit of
:func:`gradleak.batch.mass.fit_counts`) from ``S_p`` computed

- exactly, from every example's own prediction (eps then comes back to the gradient's rounding);
- at the class means, given the batch's true mean feature;
- at the class means, given the head's estimate of the mean feature (what ``recover_batch`` starts from);
- the class means fitted to both of the head's gradients to second order in the examples' spread along the
  batch's mean logits, from the last estimate (:func:`gradleak.batch.spread.fit_spread`, what ``recover_batch``
  answers with);

the class means being refitted with each new eps until eps settles. Beside them, ``recover_batch``'s own eps (its
counts found, not held). The batches are the batch experiment's (``gradleak experiment batch``: same network,
images and eps, from the same per-batch seeds), smoothed labels only. Prints the eps errors side by side and writes
a CSV.

    python benchmarks/bench_batch_mean_feature.py --network resnet18 --batch-sizes 16 32 64 --samples 5
"""
from __future__ import annotations

import argparse
import statistics

import torch
from tqdm.auto import tqdm

from gradleak.batch.api import recover_batch
from gradleak.batch.mass import class_mean_logits, class_prediction_mass, fit_counts, mean_feature
from gradleak.batch.spread import fit_spread
from gradleak.data import DATASETS, load_samples
from gradleak.experiments.batch import add_batch_options, batch_rng, victim_batch, victim_model
from gradleak.experiments.common import write_rows
from gradleak.head import head_gradients

#: Rounds of refitting the class means with the last eps (the change in eps is below 1e-9 well before).
ROUNDS = 30
WAYS = ("exact", "true_mean", "estimated_mean", "second_order")


def settled_eps(logits_grad, bias_grad, bias, feature_logits, counts, size):
    """``(eps, class mean logits (C, C))`` with ``counts`` (C,) held, the class means refitted with each round's eps
    from the mean feature's logits ``feature_logits`` (C,) until eps settles."""
    eps = torch.zeros(1, dtype=torch.float64)
    for _ in range(ROUNDS):
        logits = class_mean_logits(logits_grad, bias_grad, feature_logits[None], counts[None], eps)
        prediction = class_prediction_mass(bias, logits, counts[None])[0]
        eps = torch.tensor([fit_counts(prediction - size * bias_grad, counts, None, size).eps], dtype=torch.float64)
    return float(eps), logits[0]


def batch_row(model, images, labels, num_classes, size, sample, seed):
    gradients, truth = victim_batch(model, images, labels, num_classes, "smoothing", size,
                                    batch_rng(seed, "smoothing", size, sample))
    parts = {name: value.detach().double() for name, value in head_gradients(model, gradients).items()}
    weight, bias, weight_grad, bias_grad = parts["weight"], parts["bias"], parts["weight_grad"], parts["bias_grad"]
    features, counts = truth["features"].double(), truth["counts"]
    logits_grad = weight_grad @ weight.T
    exact = torch.softmax(features @ weight.T + bias, -1).sum(0)
    empty = counts == 0
    estimated = mean_feature(logits_grad, bias_grad, empty if bool(empty.any()) else None)
    estimated_eps, class_logits = settled_eps(logits_grad, bias_grad, bias, estimated, counts, size)
    eps = {"exact": fit_counts(exact - size * bias_grad, counts, None, size).eps,
           "true_mean": settled_eps(logits_grad, bias_grad, bias, features.mean(0) @ weight.T, counts, size)[0],
           "estimated_mean": estimated_eps,
           "second_order": fit_spread(logits_grad, bias_grad, bias, class_logits, counts, estimated_eps, size).eps}
    found = recover_batch(model, gradients, batch_size=size)
    row = {"B": size, "sample": sample, "eps": truth["eps"], "classes_held": int((counts > 0).sum()),
           **{f"error_{way}": abs(eps[way] - truth["eps"]) for way in WAYS},
           "error_recover_batch": "" if found.eps is None else abs(found.eps - truth["eps"]),
           "counts_exact": found.counts is not None and torch.equal(found.counts.cpu(), counts)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_batch_options(parser, network="resnet18", batch_sizes=[16, 32, 64])
    parser.add_argument("--out", default="bench-batch-mean-feature.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, side, _ = victim_model(args.dataset, args.network, "untrained", args.init, args.seed)
    images, labels = load_samples(args.dataset, size=side)
    jobs = [(size, sample) for size in args.batch_sizes for sample in range(args.samples)]
    rows = [batch_row(model, images, labels, DATASETS[args.dataset].num_classes, size, sample, args.seed)
            for size, sample in tqdm(jobs, desc="batches")]
    write_rows(args.out, rows)
    print(f"{args.network} ({args.init} init), smoothed batches, eps error with the true counts held: median "
          f"(largest) over {args.samples} batches per B; within 1e-3: how many")
    print("| B | exact summed predictions | class means, true mean feature | class means, estimated mean feature "
          "| second order in the spread | recover_batch (counts found) |")
    print("|---|---|---|---|---|---|")
    for size in args.batch_sizes:
        cells = []
        for column in [f"error_{way}" for way in WAYS] + ["error_recover_batch"]:
            errors = [row[column] for row in rows if row["B"] == size and row[column] != ""]
            within = sum(error < 1e-3 for error in errors)
            cells.append(f"{statistics.median(errors):.1e} ({max(errors):.1e}), {within}/{len(errors)}"
                         if errors else "-")
        print(f"| {size} | " + " | ".join(cells) + " |")
    print(f"per-batch rows: {args.out}")


if __name__ == "__main__":
    main()
