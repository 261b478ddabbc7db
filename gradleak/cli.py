"""The ``gradleak`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    rows = run_demo(samples=args.samples, seed=args.seed, out=args.out, progress=not args.quiet)
    print(format_table(rows))
    print(f"\nwritten: {Path(args.out) / 'demo.csv'}, {Path(args.out) / 'demo.json'}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    import torch

    from .client import single_example_gradients
    from .data import DATASETS, load_samples
    from .labels import mix_inputs, mixup_label, smooth_label
    from .models import build_model
    from .recovery import recover_from_gradients
    from .update import recover_from_update
    from .updates_client import sgd_update

    if args.lr is not None and not args.lr > 0:
        print(f"--lr must be positive, got {args.lr}", file=sys.stderr)
        return 2
    info = DATASETS[args.dataset]
    images, labels = load_samples(args.dataset, size=args.size)
    model = build_model(args.network, info.num_classes, seed=args.seed)
    a, b = args.sample, (args.sample + 1) % len(labels)
    if args.label == "mixup":
        while int(labels[b]) == int(labels[a]):
            b = (b + 1) % len(labels)
        x = mix_inputs(images[a], images[b], args.lam)
        truth = mixup_label(int(labels[a]), int(labels[b]), args.lam, info.num_classes, dtype=torch.float32)
    else:
        x = images[a]
        truth = smooth_label(int(labels[a]), info.num_classes, args.eps if args.label == "smoothing" else 0.0,
                             dtype=torch.float32)
    options = dict(label_format=args.format, method=args.method)
    if args.lr is None:
        true_scale = 1.0
        grads = single_example_gradients(model, x, truth)
        result = recover_from_gradients(model, grads, gradient_scale="unknown" if args.unknown_scale else "known",
                                        **options)
    else:
        # the victim: one plain SGD step on its example; the attacker sees the update new - old
        true_scale = -args.lr
        update = sgd_update(model, x, truth, lr=args.lr)
        result = recover_from_update(model, update, lr=None if args.unknown_scale else args.lr, **options)
    report = {k: v for k, v in vars(result).items() if k not in ("label", "feature", "extra")}
    report["max_label_error"] = float((result.label - truth).abs().max())
    report["true_gradient_scale"] = true_scale
    print(json.dumps(report, indent=1, default=str))
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .experiments.reconstruction import run_reconstruction

    report = run_reconstruction(args.network, args.dataset, args.label, args.methods, label_variants=args.variants,
                                sample=args.sample, seed=args.seed, iterations=args.iterations, out_dir=args.out,
                                image=args.image, target=args.target,
                                dtype=torch.float64 if args.float64 else torch.float32, progress=not args.quiet)
    for run, metrics in report["results"].items():
        scores = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"{run:24} {scores}")
    print(f"written: {', '.join(str(f) for f in report['files'].values())}" if report.get("files") else "")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS

    if args.name not in EXPERIMENTS:
        print(f"unknown experiment {args.name!r}; choose from {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    options = {k: v for k, v in vars(args).items() if k not in ("command", "name", "handler") and v is not None}
    result = EXPERIMENTS[args.name](**options)
    if isinstance(result, dict):  # the headline values (paths, accuracies); the files hold the rest
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (str, int, float))}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradleak", description="What one example's gradient leaks: label, "
                                     "last-layer feature, input.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="recover soft labels from real CIFAR-10 gradients (LeNet, ResNet18)")
    demo.add_argument("--samples", type=int, default=8, help="samples per network and label format")
    demo.add_argument("--seed", type=int, default=2023)
    demo.add_argument("--out", default="gradleak-demo", help="folder for demo.csv and demo.json")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo)

    recover = sub.add_parser("recover", help="recover one built-in sample's label and print the full result")
    recover.add_argument("--dataset", default="cifar10")
    recover.add_argument("--network", default="lenet")
    recover.add_argument("--size", type=int, default=None, help="resize the images (e.g. 64 for fcn4/alexnet)")
    recover.add_argument("--sample", type=int, default=0)
    recover.add_argument("--label", choices=["hard", "smoothing", "mixup"], default="smoothing",
                         help="the victim's label")
    recover.add_argument("--eps", type=float, default=0.2)
    recover.add_argument("--lam", type=float, default=0.3)
    recover.add_argument("--format", default="auto", help="what the attacker assumes: auto|hard|smoothing|mixup")
    recover.add_argument("--method", default="exact", help="exact|pso|lbfgs")
    recover.add_argument("--seed", type=int, default=0)
    recover.add_argument("--lr", type=float, help="the victim takes one plain SGD step with this learning rate and "
                         "the attacker gets the weight update new - old (recovered with this lr)")
    recover.add_argument("--unknown-scale", dest="unknown_scale", action="store_true",
                         help="the attacker is not told the scale: the lr of --lr, or that the gradient is unscaled")
    recover.set_defaults(handler=_recover)

    reconstruct = sub.add_parser("reconstruct", help="rebuild the input from its gradient (analytic / matching)")
    reconstruct.add_argument("--network", default="fcn4")
    reconstruct.add_argument("--dataset", default="cifar10", help="built-in samples, and the normalisation of --image")
    reconstruct.add_argument("--label", choices=["hard", "smoothing", "mixup"], default="smoothing",
                             help="the victim's label format")
    reconstruct.add_argument("--methods", nargs="+", default=["analytic"], help="analytic | ig | dlg")
    reconstruct.add_argument("--variants", nargs="+", default=["recovered"],
                             help="labels for gradient matching: recovered | true | hard | dlg")
    reconstruct.add_argument("--sample", type=int, default=0)
    reconstruct.add_argument("--image", help="a user image file instead of a built-in sample")
    reconstruct.add_argument("--target", type=int, help="the class of --image")
    reconstruct.add_argument("--iterations", type=int)
    reconstruct.add_argument("--seed", type=int, default=2023)
    reconstruct.add_argument("--float64", action="store_true", help="victim model and gradient in float64")
    reconstruct.add_argument("--out", default="gradleak-reconstruct", help="folder for the PNG grid and JSON")
    reconstruct.add_argument("--quiet", action="store_true")
    reconstruct.set_defaults(handler=_reconstruct)

    experiment = sub.add_parser("experiment", help="run one of the paper's experiments (tables and figures)")
    experiment.add_argument("name", help="label-recovery | noise | landscape | train | reconstruction | report | dp | "
                                         "local-steps")
    experiment.add_argument("--dataset")
    experiment.add_argument("--network")
    experiment.add_argument("--samples", type=int)
    experiment.add_argument("--seed", type=int)
    experiment.add_argument("--weights", help="'untrained' or a checkpoint path")
    experiment.add_argument("--out", help="output folder (resumable)")
    experiment.add_argument("--formats", nargs="+", help="victim label formats: smoothing mixup hard")
    experiment.add_argument("--methods", nargs="+",
                            help="exact exact-head exact-auto lbfgs pso lbfgs+pso idlg yin rlg (label-recovery, noise)")
    experiment.add_argument("--image-size", dest="image_size", type=int, help="resize the samples (fcn4: 64)")
    experiment.add_argument("--augmentation", help="train: smoothing | mixup | none")
    experiment.add_argument("--stds", nargs="+", type=float, help="noise: standard deviations (x gradient RMS)")
    experiment.add_argument("--clips", nargs="+", type=float,
                            help="dp: clipping norms (times the example's gradient norm unless --clip-scale absolute)")
    experiment.add_argument("--clip-scale", dest="clip_scale", choices=["relative", "absolute"], help="dp")
    experiment.add_argument("--noise-multipliers", dest="noise_multipliers", nargs="+", type=float,
                            help="dp: Opacus noise multipliers")
    experiment.add_argument("--steps", nargs="+", type=int, help="local-steps: the client's local SGD steps K")
    experiment.add_argument("--lrs", nargs="+", type=float, help="local-steps: the client's learning rates")
    experiment.add_argument("--scales", nargs="+", choices=["known", "unknown"],
                            help="dp, local-steps: whether the server is told the learning rate")
    experiment.add_argument("--quick", action="store_true", default=None, help="the small preset CI runs")
    experiment.set_defaults(handler=_experiment)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
