"""The ``gradleak`` command line.

Errors a user can fix (a bad option value, a missing file, a sample out of range) print one line and exit with 2,
as argparse does; anything else is a bug: one line and exit 1, the traceback with ``--debug``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

from ._checks import bounded
from ._json import strict_json
from .data import DATASETS
from .models import MODELS

LABELS = ("hard", "smoothing", "mixup")
ATTACKER_FORMATS = ("auto",) + LABELS
RECOVERY_METHODS = ("exact", "pso", "lbfgs")
RECONSTRUCTION_METHODS = ("analytic", "ig", "dlg")
LABEL_VARIANTS = ("recovered", "true", "hard", "dlg")


class UsageError(ValueError):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _rounded(values: Any, digits: int = 7) -> List[float]:
    return [round(float(v), digits) for v in values]


# ------------------------------------------------------------------------------------------------ subcommands

def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    rows = run_demo(samples=args.samples, seed=args.seed, out=args.out, progress=not args.quiet)
    print(format_table(rows))
    print(f"\nwritten: {Path(args.out) / 'demo.csv'}, {Path(args.out) / 'demo.json'}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    import torch

    from .client import single_example_gradients
    from .experiments.common import setup
    from .labels import mix_inputs, mixup_label, smooth_label
    from .recovery import recover_from_gradients
    from .update import recover_from_update
    from .updates_client import sgd_update

    env = setup(args.dataset, args.network, args.weights, seed=args.seed, image_size=args.size)
    images, labels, classes = env.images, env.labels, env.num_classes
    if args.sample >= len(labels):
        raise UsageError(f"--sample {args.sample} is outside the {len(labels)} built-in {args.dataset} samples "
                         f"(0 to {len(labels) - 1})")
    a = args.sample
    if args.label == "mixup":
        b = next((i % len(labels) for i in range(a + 1, a + len(labels)) if labels[i % len(labels)] != labels[a]),
                 None)
        if b is None:
            raise UsageError(f"mixup needs a second sample of another class; {args.dataset} has none")
        x = mix_inputs(images[a], images[b], args.lam)
        truth = mixup_label(int(labels[a]), int(labels[b]), args.lam, classes, dtype=torch.float32)
        victim = {"label": "mixup", "classes": [int(labels[a]), int(labels[b])], "lam": args.lam}
    else:
        eps = args.eps if args.label == "smoothing" else 0.0
        x = images[a]
        truth = smooth_label(int(labels[a]), classes, eps, dtype=torch.float32)
        victim = {"label": args.label, "classes": [int(labels[a])], "eps": eps}
    options = dict(label_format=args.format, method=args.method, use_feature_layer=not args.head_only)
    if args.lr is None:
        true_scale = 1.0
        grads = single_example_gradients(env.model, x, truth)
        result = recover_from_gradients(env.model, grads, gradient_scale="unknown" if args.unknown_scale else "known",
                                        **options)
    else:
        # the victim: one plain SGD step on its example; the attacker sees the update new - old
        true_scale = -args.lr
        update = sgd_update(env.model, x, truth, lr=args.lr)
        result = recover_from_update(env.model, update, lr=None if args.unknown_scale else args.lr, **options)
    print(json.dumps(strict_json(_recovery_report(result, truth, victim, true_scale, args)), indent=1,
                     allow_nan=False))
    return 0


def _recovery_report(result: Any, truth: Any, victim: dict, true_scale: float, args: argparse.Namespace) -> dict:
    """The full result as plain JSON values: the attacker's answer (label, weights per class, feature summary,
    diagnostics), then the evaluator's comparison with the victim's truth."""
    feature = result.feature.double()
    if result.label_format == "mixup":
        # lam is the weight of classes[1], the higher-numbered class; both weights are listed to avoid doubt
        a, b = result.classes
        weights = {str(a): (1 - result.lam) * (1 - result.eps), str(b): result.lam * (1 - result.eps)}
    else:
        weights = {str(result.classes[0]): 1 - result.eps}
    answer = {
        "label_format": result.label_format, "classes": list(result.classes), "class_weights": weights,
        "eps": result.eps, "lam": result.lam,
        "lam_is_weight_of_class": result.classes[1] if result.label_format == "mixup" else None,
        "determined": result.determined, "message": result.message, "method": result.method,
        "label": _rounded(result.label),
        "feature": {"dim": feature.numel(), "norm": float(feature.norm()), "min": float(feature.min()),
                    "max": float(feature.max()), "nonzero": int((feature != 0).sum()),
                    "first": _rounded(feature[:8])},
        "gradient_scale": result.gradient_scale, "scale_t": result.scale, "residual": result.residual,
        "margin": result.margin, "residuals": result.residuals, "rank_one_ratio": result.rank_one_ratio,
        "row_sum_error": result.row_sum_error, "label_valid": result.label_valid, "tol": result.tol,
        "evaluations": result.evaluations, "converged": result.converged,
    }
    evaluation = {"victim": dict(victim, network=args.network, dataset=args.dataset, sample=args.sample),
                  "true_label": _rounded(truth), "max_label_error": float((result.label - truth).abs().max()),
                  "true_gradient_scale": true_scale}
    return {"recovered": answer, "evaluation": evaluation}


def _reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .experiments.reconstruction import run_reconstruction

    if args.image is not None:
        if not Path(args.image).is_file():
            raise UsageError(f"--image {args.image!r}: no such file")
        if args.target is None:
            raise UsageError("--image needs --target, the class of the image (the victim's label is built from it)")
    report = run_reconstruction(args.network, args.dataset, args.label, args.methods, label_variants=args.variants,
                                sample=args.sample, seed=args.seed, iterations=args.iterations, out_dir=args.out,
                                image=args.image, target=args.target,
                                dtype=torch.float64 if args.float64 else torch.float32, progress=not args.quiet)
    recovery = report["recovery"]
    print(f"label recovery: {recovery['label_format']}, determined {recovery['determined']}, "
          f"max label error {recovery['label_error']:.2e}")
    print(f"{'run':24} {'PSNR dB':>8} {'SSIM':>7} {'LPIPS':>7} {'seconds':>8}")
    for run, metrics in report["results"].items():
        lpips = "-" if metrics.get("lpips") is None else f"{metrics['lpips']:.3f}"
        print(f"{run:24} {metrics['psnr']:8.2f} {metrics['ssim']:7.4f} {lpips:>7} {metrics['seconds']:8.2f}")
    if report.get("files"):
        print(f"written: {', '.join(str(f) for f in report['files'].values())}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS

    options = {k: v for k, v in vars(args).items()
               if k not in ("command", "name", "handler", "debug") and v is not None}
    result = EXPERIMENTS[args.name](**options)
    if isinstance(result, dict):  # the headline values (paths, accuracies); the files hold the rest
        headline = {k: v for k, v in result.items() if isinstance(v, (str, int, float))}
        print(json.dumps(strict_json(headline), indent=1, allow_nan=False))
    return 0


# ------------------------------------------------------------------------------------------------ the parser

EXPERIMENT_HELP = """\
experiments (the options each one reads; the others are ignored):
  label-recovery  Tables 1-2: --dataset --network --weights --samples --formats --methods --image-size --seed
  noise           noise on the whole gradient: the above and --stds
  dp              one Opacus DP-SGD step: --network --samples --formats --clips --clip-scale
                  --noise-multipliers --scales --seed
  local-steps     K local SGD steps: --network --samples --formats --steps --lrs --scales --seed
  landscape       Figure 1: --dataset --network --seed
  train           a checkpoint for the trained rows: --dataset --network --augmentation --head-bias
                  --out (a .pt path)
  reconstruction  one sample reconstructed: --dataset --network --methods (analytic ig dlg) --variants
                  --iterations --seed
  label-variants  the README's gradient-matching table: --dataset --network --samples --seed --methods (dlg ig)
                  --variants --iterations --image-size
  report          one accuracy table from every label-recovery run under --out
  batch           batch label recovery against B, beside iLRG/LLG/LLG*/Yin/iDLG: --dataset --network --init
                  --weights (a checkpoint with a head bias)
                  --formats (hard smoothing mixup mixup-pairs) --methods --batch-sizes --samples --seed
every experiment reads --out (resumable folder), --quick (the small preset CI runs) and --quiet;
label-recovery, noise, dp, local-steps and batch read --ray [ADDRESS] (their trials as Ray tasks: the same CSV)."""


def build_parser() -> argparse.ArgumentParser:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    parser = _Parser(prog="gradleak", formatter_class=defaults,
                                     description="What one example's gradient leaks: label, last-layer feature, "
                                                 "input.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    networks, datasets = sorted(MODELS), sorted(DATASETS)
    count = bounded(int, "the number of samples", 1)
    index = bounded(int, "the sample index", 0)

    demo = sub.add_parser("demo", formatter_class=defaults,
                          help="recover soft labels from real CIFAR-10 gradients (LeNet, ResNet18)")
    demo.add_argument("--samples", type=count, default=8, help="samples per network and label format")
    demo.add_argument("--seed", type=int, default=2023, help="seeds the networks and the victims' labels")
    demo.add_argument("--out", default="gradleak-demo", help="folder for demo.csv and demo.json")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo)

    recover = sub.add_parser("recover", formatter_class=defaults,
                             help="recover one built-in sample's label and print the full result as JSON",
                             description="A victim computes the gradient of one built-in sample with the label "
                                         "you choose; the attacker recovers label and feature from it. Prints "
                                         "JSON: 'recovered' (what the attacker concluded) and 'evaluation' "
                                         "(the comparison with the truth). For mixup, lam is the weight of "
                                         "classes[1], the higher-numbered class; class_weights lists both.")
    recover.add_argument("--dataset", choices=datasets, default="cifar10", help="the built-in samples")
    recover.add_argument("--network", choices=networks, default="lenet", help="the victim's network (untrained "
                         "unless --weights)")
    recover.add_argument("--weights", default="untrained", help="'untrained' or a checkpoint from "
                         "'gradleak experiment train'")
    recover.add_argument("--size", type=bounded(int, "--size", 8), default=None,
                         help="image side (default: the network's paper setting, else the dataset's)")
    recover.add_argument("--sample", type=index, default=0, help="index of the built-in sample")
    recover.add_argument("--label", choices=LABELS, default="smoothing", help="the victim's label")
    recover.add_argument("--eps", type=bounded(float, "--eps", 0.0, 1.0, open_high=True), default=0.2,
                         help="the victim's smoothing mass (--label smoothing)")
    recover.add_argument("--lam", type=bounded(float, "--lam", 0.0, 1.0), default=0.3,
                         help="the victim's mixup weight of the second sample's class (--label mixup)")
    recover.add_argument("--format", choices=ATTACKER_FORMATS, default="auto",
                         help="the label format the attacker assumes (auto: detect it)")
    recover.add_argument("--method", choices=RECOVERY_METHODS, default="exact",
                         help="exact: gradleak (closed forms, then the exact search); pso, lbfgs: the paper's "
                              "searches on the head, as named (they need --format)")
    recover.add_argument("--head-only", dest="head_only", action="store_true",
                         help="exact from the head's gradient alone, without the layer below (as the paper)")
    recover.add_argument("--seed", type=int, default=0, help="seeds the network")
    recover.add_argument("--lr", type=bounded(float, "--lr", 0.0, open_low=True), default=None,
                         help="the victim takes one plain SGD step with this learning rate and the attacker gets "
                              "the weight update new - old (recovered with this lr unless --unknown-scale)")
    recover.add_argument("--unknown-scale", dest="unknown_scale", action="store_true",
                         help="the attacker is not told the scale: the lr of --lr, or that the gradient is unscaled")
    recover.set_defaults(handler=_recover)

    reconstruct = sub.add_parser("reconstruct", formatter_class=defaults,
                                 help="rebuild the input from its gradient (analytic / gradient matching)")
    reconstruct.add_argument("--network", choices=networks, default="fcn4", help="the victim's network (untrained)")
    reconstruct.add_argument("--dataset", choices=datasets, default="cifar10",
                             help="built-in samples, and the normalisation of --image")
    reconstruct.add_argument("--label", choices=LABELS, default="smoothing", help="the victim's label format")
    reconstruct.add_argument("--methods", nargs="+", choices=RECONSTRUCTION_METHODS, default=["analytic"],
                             help="analytic (fully connected nets), ig (Inverting Gradients), dlg (DLG)")
    reconstruct.add_argument("--variants", nargs="+", choices=LABEL_VARIANTS, default=["recovered"],
                             help="labels for gradient matching: recovered (ours), true, hard, dlg (joint)")
    reconstruct.add_argument("--sample", type=index, default=0, help="index of the built-in sample")
    reconstruct.add_argument("--image", help="a user image file instead of a built-in sample (needs --target)")
    reconstruct.add_argument("--target", type=index, help="the class of --image")
    reconstruct.add_argument("--iterations", type=count, help="matching iterations (default: the method's own)")
    reconstruct.add_argument("--seed", type=int, default=2023, help="seeds the network, eps/lam and the dummy")
    reconstruct.add_argument("--float64", action="store_true", help="victim model and gradient in float64")
    reconstruct.add_argument("--out", default="gradleak-reconstruct", help="folder for the PNG grid and JSON")
    reconstruct.add_argument("--quiet", action="store_true", help="no progress bar")
    reconstruct.set_defaults(handler=_reconstruct)

    from .experiments import EXPERIMENTS

    experiment = sub.add_parser("experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
                                help="run one of the paper's experiments (tables and figures)",
                                epilog=EXPERIMENT_HELP)
    experiment.add_argument("name", choices=sorted(EXPERIMENTS), help="the experiment")
    experiment.add_argument("--dataset", choices=datasets, help="built-in dataset")
    experiment.add_argument("--network", choices=networks, help="the victim's network")
    experiment.add_argument("--samples", type=count, help="trials per label format (or samples)")
    experiment.add_argument("--seed", type=int, help="seeds the networks and the victims")
    experiment.add_argument("--weights", help="'untrained' or a checkpoint path")
    experiment.add_argument("--out", help="output folder (resumable); train: the checkpoint path")
    experiment.add_argument("--formats", nargs="+", choices=LABELS + ("mixup-pairs",),
                            help="victim label formats (mixup-pairs: batch only)")
    experiment.add_argument("--methods", nargs="+",
                            help="label-recovery, noise: exact exact-head exact-auto lbfgs pso lbfgs+pso idlg yin "
                                 "rlg; reconstruction: analytic ig dlg; label-variants: dlg ig; batch: gradleak ilrg "
                                 "llg llg* yin idlg")
    experiment.add_argument("--variants", nargs="+", choices=LABEL_VARIANTS,
                            help="reconstruction, label-variants: labels for gradient matching")
    experiment.add_argument("--iterations", type=count, help="reconstruction, label-variants: matching iterations")
    experiment.add_argument("--image-size", dest="image_size", type=bounded(int, "--image-size", 8),
                            help="resize the samples (default: the network's paper setting)")
    experiment.add_argument("--augmentation", choices=("smoothing", "mixup", "none"), help="train")
    experiment.add_argument("--stds", nargs="+", type=bounded(float, "--stds", 0.0),
                            help="noise: standard deviations (x gradient RMS)")
    experiment.add_argument("--clips", nargs="+", type=bounded(float, "--clips", 0.0),
                            help="dp: clipping norms (times the example's gradient norm unless --clip-scale absolute)")
    experiment.add_argument("--clip-scale", dest="clip_scale", choices=["relative", "absolute"], help="dp")
    experiment.add_argument("--noise-multipliers", dest="noise_multipliers", nargs="+",
                            type=bounded(float, "--noise-multipliers", 0.0), help="dp: Opacus noise multipliers")
    experiment.add_argument("--steps", nargs="+", type=bounded(int, "--steps", 1),
                            help="local-steps: the client's local SGD steps K")
    experiment.add_argument("--lrs", nargs="+", type=bounded(float, "--lrs", 0.0), help="local-steps: the client's "
                            "learning rates")
    experiment.add_argument("--scales", nargs="+", choices=["known", "unknown"],
                            help="dp, local-steps: whether the server is told the learning rate")
    experiment.add_argument("--batch-sizes", dest="batch_sizes", nargs="+", type=bounded(int, "--batch-sizes", 1),
                            help="batch: the batch sizes B")
    experiment.add_argument("--head-bias", dest="head_bias", action="store_true", default=None,
                            help="train: give the head a bias (the batch experiment needs one)")
    experiment.add_argument("--init", choices=["default", "paper"],
                            help="batch: the untrained network's initialisation (PyTorch's default or the paper's)")
    experiment.add_argument("--quick", action="store_true", default=None, help="the small preset CI runs")
    experiment.add_argument("--quiet", dest="progress", action="store_false", default=None, help="no progress bars")
    experiment.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                            help="label-recovery, noise, dp, local-steps, batch: run the trials as Ray tasks on a "
                                 "local Ray (no ADDRESS) or the cluster at ADDRESS ('auto', 'ray://host:10001'); the "
                                 "same CSV as a serial run")
    experiment.set_defaults(handler=_experiment)
    from .fl.cli import add_audit_parser  # `gradleak audit`: flwr is imported only when it runs
    add_audit_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, ValueError, FileNotFoundError, ImportError) as error:
        # the library's own checks name the problem (a bad value, a missing file or optional package)
        if args.debug:
            raise
        print(f"gradleak {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"gradleak {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: one line here, the traceback with --debug
        if args.debug:
            raise
        print(f"gradleak {args.command}: internal error: {type(error).__name__}: {error} (run with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
