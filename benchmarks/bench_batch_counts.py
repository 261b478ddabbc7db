"""Batch counts on batches of random classes, side by side: gradleak's class mass against iLRG, on the same gradients.

The batch experiment (``gradleak experiment batch``) gives each image its own CIFAR-10 label; here every batch draws
its images from the bundled ones with repeats and its classes at random, independently of the images, and every
network is built afresh for each of ``--models`` seeds. That stresses what the tables do not: batches whose classes
say nothing about their images. For each batch, gradleak's counts (``recover_batch(..., split=False)``: the class
mass alone), detecting the format itself ("auto") and told it (as iLRG, a hard-label method, assumes hard labels),
and iLRG's are compared with the truth, and the evaluator counts gradleak's confident wrong claims in either mode:
counts reported as pinned (``counts_determined``) while wrong, and answers reported as determined while wrong.
Prints a table and writes a CSV.

    python benchmarks/bench_batch_counts.py --network lenet --init paper --batch-sizes 16 32 64 128
"""
from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

import gradleak
from gradleak.batch.baselines import ilrg
from gradleak.data import load_samples
from gradleak.experiments.batch import victim_model
from gradleak.experiments.common import markdown_table, write_rows

FORMATS = ("hard", "smoothing")
EPS_RANGE = (0.01, 0.3)


def random_batch(model: torch.nn.Module, images: torch.Tensor, size: int, label_format: str, seed: int):
    """``(gradients, true counts, eps)`` of one batch: ``size`` images drawn with repeats and classes drawn at
    random, labels smoothed with one eps ~ U(0.01, 0.3) (0 for hard labels)."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = model.head.out_features
    x = images[torch.randint(images.shape[0], (size,), generator=generator)]
    classes = torch.randint(num_classes, (size,), generator=generator)
    eps = float(torch.empty(()).uniform_(*EPS_RANGE, generator=generator)) if label_format == "smoothing" else 0.0
    targets = torch.nn.functional.one_hot(classes, num_classes).float() * (1 - eps) + eps / num_classes
    model.zero_grad(set_to_none=True)
    gradleak.soft_cross_entropy(model(x), targets).backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return gradients, torch.bincount(classes, minlength=num_classes), eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", default="lenet")
    parser.add_argument("--init", default="paper", choices=["default", "paper"])
    parser.add_argument("--batch-sizes", dest="batch_sizes", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    counts = {"--models": (4, "networks (init seeds) per cell"), "--batches": (6, "batches per network and cell"),
              "--threads": (1, "torch CPU threads")}
    for option, (default, text) in counts.items():
        parser.add_argument(option, type=int, default=default, help=text)
    parser.add_argument("--out", default="bench-batch-counts.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    built = [victim_model("cifar10", args.network, init=args.init, seed=seed) for seed in range(args.models)]
    networks = [model for model, _, _ in built]
    images, _ = load_samples("cifar10", size=built[0][1])   # the experiment's image side for this network
    cells = [(size, label_format, m, b) for size in args.batch_sizes for label_format in args.formats
             for m in range(args.models) for b in range(args.batches)]
    rows = []
    for size, label_format, m, b in tqdm(cells, desc=f"{args.network} ({args.init} init) batch counts"):
        gradients, truth, eps = random_batch(networks[m], images, size, label_format, seed=1000 * m + b)
        row = dict(network=args.network, init=args.init, format=label_format, batch_size=size, model=m, batch=b,
                   ilrg_counts_exact=torch.equal(ilrg(networks[m], gradients, size).counts, truth))
        for mode, told in (("auto", "auto"), ("told", label_format)):
            ours = gradleak.recover_batch(networks[m], gradients, batch_size=size, label_format=told, split=False)
            right = ours.counts is not None and torch.equal(ours.counts, truth)
            eps_right = label_format == "hard" or (ours.eps is not None and abs(ours.eps - eps) <= 1e-3)
            row.update({f"{mode}_counts_exact": right, f"{mode}_counts_pinned": ours.counts_determined,
                        f"{mode}_confident_wrong": (ours.counts_determined and not right)
                        or (ours.determined and not (right and eps_right))})
        rows.append(row)
    write_rows(args.out, rows)
    table = []
    for size in args.batch_sizes:
        for label_format in args.formats:
            cell = [r for r in rows if r["batch_size"] == size and r["format"] == label_format]
            total = lambda key: sum(r[key] for r in cell)  # noqa: E731
            table.append([size, label_format,
                          f"{total('auto_counts_exact')} / {total('told_counts_exact')} / {total('ilrg_counts_exact')}",
                          f"{total('auto_counts_pinned')} / {total('told_counts_pinned')}",
                          f"{total('auto_confident_wrong')} / {total('told_confident_wrong')}"])
    print(f"\n{args.network} ({args.init} init), random classes, {args.models * args.batches} batches per cell "
          "(gradleak detecting the format / told it)\n")
    print(markdown_table(["B", "format", "counts exact: auto / told / iLRG", "pinned: auto / told",
                          "confident wrong: auto / told"], table))
    print(f"per-batch rows: {args.out}")


if __name__ == "__main__":
    main()
