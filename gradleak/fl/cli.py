"""``gradleak audit``: simulate a Flower federation on Ray, audit every client update, write the report.

    gradleak audit --quick --out audit                 # 12 clients x 2 rounds, every recipe once per round
    gradleak audit --num-clients 100 --rounds 2 --batch-size 1 --augmentation smoothing --clip none 0.5
    gradleak audit --ray-address auto --out audit      # on an existing Ray cluster (DIR shared by its nodes)
    gradleak audit report audit                         # rebuild report.html, records.csv, summary.json

This module imports without Flower: :func:`add_audit_parser` only builds the parser; Flower and Ray are imported
when the simulation runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Dict, List, Optional

from .._checks import bounded
from ..data import DATASETS
from ..models import MODELS
from . import FLWR_MISSING, import_with_flwr
from .records import AuditRecord

#: the settings each client's recipe is dealt from, and the run's size, per preset (options override them)
PRESETS: Dict[str, Dict[str, object]] = {
    "quick": dict(num_clients=12, rounds=2, batch_sizes=[1, 4], augmentations=["none", "smoothing", "mixup"],
                  clips=[None, 0.5]),
    "default": dict(num_clients=36, rounds=3, batch_sizes=[1, 4], augmentations=["none", "smoothing", "mixup"],
                    clips=[None, 0.5]),
}


def _clip(text: str) -> Optional[float]:
    """A clipping norm: a positive number, or "none" / "off" / "0" for a client that does not clip."""
    if text.lower() in ("none", "off", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a clipping norm is a positive number or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a clipping norm must be positive (or 'none'), got {text!r}")
    return value


def add_audit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``audit`` (and ``audit report DIR``) to a parser's sub-commands; returns the ``audit`` parser.

    Per-client options take several values: client ``i`` gets augmentation ``i mod A``, batch size
    ``(i div A) mod B`` and clipping ``(i div AB) mod K``.
    """
    audit = subparsers.add_parser(
        "audit", formatter_class=argparse.ArgumentDefaultsHelpFormatter, help="audit a simulated Flower federation (Ray): what each client update leaks to the server",
        description="Run a Flower simulation (flwr.simulation.run_simulation, Ray backend) whose server strategy is "
                    "wrapped in gradleak.fl.LeakageAudit, then write DIR/report.html (self-contained), "
                    "DIR/records.jsonl (the attacker's conclusions), DIR/truth.jsonl (the clients' truth, for "
                    "scoring only), records.csv and summary.json. Needs pip install gradleak[fl].")
    audit.add_argument("--quick", action="store_true", help="the small preset: 12 clients x 2 rounds "
                       "(default: 36 x 3); every recipe of the default lists is dealt once per 12 clients")
    audit.add_argument("--num-clients", dest="num_clients", type=bounded(int, "--num-clients", 1), help="simulated clients (Flower SuperNodes)")
    audit.add_argument("--rounds", type=bounded(int, "--rounds", 1), help="federated rounds (FedAvg over every client)")
    audit.add_argument("--network", default="mlp", choices=["mlp"] + sorted(MODELS), help="mlp (input-128-64-C, ReLU, biases: analytic "
                       "reconstructions), lenet, fcn4, alexnet, resnet18, resnet50")
    audit.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), help="bundled samples: cifar10 (20 images, shared when "
                       "clients need more), cifar100, mnist, fashion_mnist, imagenet, digits, mnist5000")
    audit.add_argument("--image-size", dest="image_size", type=bounded(int, "--image-size", 8), help="resize the images (default: native)")
    audit.add_argument("--batch-size", dest="batch_sizes", type=bounded(int, "--batch-size", 1), nargs="+",
                       help="local batch sizes, dealt to the clients (1 = FedSGD on one example; default: 1 4)")
    audit.add_argument("--local-steps", dest="local_steps", type=bounded(int, "--local-steps", 1), default=1, help="SGD steps per round")
    audit.add_argument("--lr", type=bounded(float, "--lr", 0.0, open_low=True), default=0.1, help="the clients' SGD learning rate (in the train config)")
    audit.add_argument("--augmentation", dest="augmentations", nargs="+", choices=["none", "smoothing", "mixup"],
                       help="label augmentations, dealt to the clients (default: none smoothing mixup)")
    audit.add_argument("--eps", type=bounded(float, "--eps", 0.0, 1.0, open_high=True), default=0.1, help="label-smoothing eps of 'smoothing' clients")
    audit.add_argument("--mixup-alpha", dest="mixup_alpha", type=bounded(float, "--mixup-alpha", 0.0, open_low=True), default=1.0,
                       help="mixup's lambda ~ Beta(alpha, alpha)")
    audit.add_argument("--clip", dest="clips", type=_clip, nargs="+",
                       help="clipping norms of Flower's client-side fixedclipping_mod, dealt to the clients; "
                            "'none' for clients that do not clip (default: none 0.5)")
    audit.add_argument("--noise", type=bounded(float, "--noise", 0.0), default=0.0,
                       help="local DP noise multiplier of clipping clients (Flower's LocalDpMod: std = noise x clip "
                            "per entry; epsilon = sqrt(2 ln(1.25/1e-5)) / noise at delta 1e-5)")
    audit.add_argument("--partition", dest="partitioning", choices=["iid", "dirichlet"], default="iid",
                       help="how the bundled samples are split across the clients")
    audit.add_argument("--dirichlet-alpha", dest="dirichlet_alpha", type=bounded(float, "--dirichlet-alpha", 0.0, open_low=True),
                       default=0.5, help="concentration of the Dirichlet class split (smaller: less IID)")
    audit.add_argument("--hide-lr", dest="server_knows_lr", action="store_false",
                       help="the train config does not carry the lr (each client knows it): the scale is recovered")
    audit.add_argument("--reconstruct", choices=["auto", "matching", "none"], default="auto",
                       help="the server's input reconstruction: auto (analytic for fully connected nets), matching "
                            "(gradient matching with the recovered label, any network; slow on CPU), none")
    audit.add_argument("--seed", type=int, default=0, help="seeds the model, the split and the clients")
    audit.add_argument("--ray-address", dest="ray_address",
                       help="join an existing Ray cluster (e.g. 'auto' or 'ray://host:10001') instead of starting a "
                            "local one; DIR must then be on storage that every node writes to")
    audit.add_argument("--out", default="gradleak-audit", help="output folder (a previous run's files are replaced)")
    audit.add_argument("--verbose", action="store_true", help="Flower's INFO logs and the Ray workers' output")
    audit.add_argument("--quiet", action="store_true", help="no progress bar")
    audit.set_defaults(handler=_run)
    nested = audit.add_subparsers(dest="audit_command", metavar="report DIR")
    report = nested.add_parser("report", help="rebuild report.html, records.csv and summary.json from DIR's files")
    report.add_argument("dir", help="an audit folder (with records.jsonl; truth.jsonl and config.json if simulated)")
    report.set_defaults(handler=_report)
    return audit


def _print_summary(summary: Dict[str, object]) -> None:
    if not summary["scored"]:
        print(f"{summary['determined']} of {summary['updates']} updates gave a determined label "
              f"({summary['errors']} unreadable); no truth.jsonl to score them")
        return
    single, every = summary["single_example"], summary["all"]
    rate = "-" if single["leak_rate"] is None else f"{100 * single['leak_rate']:.1f} %"
    print(f"exact labels leaked: {single['leaked']} of {single['updates']} single-example updates ({rate}); "
          f"all updates: {every['leaked']} of {every['updates']}; confident wrong: {every['confident wrong']}; "
          f"batches flagged: {summary['batches_flagged']} of {summary['batches']['updates']}; "
          f"unreadable: {summary['errors']}")


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    try:
        files = write_report(args.dir)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    _print_summary(files.summary)
    print(f"written: {files.html}, {files.csv}, {files.json}")
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        if importlib.util.find_spec("ray") is None:  # Flower without its simulation extra
            raise ImportError(FLWR_MISSING)
        simulation = import_with_flwr(".simulation")
    except ImportError as error:
        print(f"gradleak audit: {error}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from .report import write_report

    preset = PRESETS["quick" if args.quick else "default"]
    settings = {key: preset[key] if getattr(args, key) is None else getattr(args, key) for key in preset}
    try:
        plan = simulation.make_plan(
            out=args.out, dataset=args.dataset, image_size=args.image_size, network=args.network, lr=args.lr,
            local_steps=args.local_steps, eps=args.eps, mixup_alpha=args.mixup_alpha, noise=args.noise,
            partitioning=args.partitioning, dirichlet_alpha=args.dirichlet_alpha,
            server_knows_lr=args.server_knows_lr, reconstruct=args.reconstruct, seed=args.seed, **settings)
    except (ValueError, TypeError) as error:
        print(f"gradleak audit: {error}", file=sys.stderr)
        return 2
    print(f"gradleak audit: {plan.num_clients} simulated clients x {plan.rounds} rounds, {plan.network} on "
          f"{plan.dataset}; starting Flower's simulation engine on Ray"
          f"{' at ' + args.ray_address if args.ray_address else ' (local)'} ...", file=sys.stderr, flush=True)
    bar = tqdm(total=plan.rounds * plan.num_clients, desc="client updates audited", unit="update",
               disable=args.quiet, file=sys.stderr)
    seen: List[AuditRecord] = []

    def progress(record: AuditRecord) -> None:
        seen.append(record)
        bar.update()
        bar.set_postfix(round=record.round, determined=sum(bool(r.determined) for r in seen),
                        errors=sum(r.error is not None for r in seen), refresh=False)

    try:
        simulation.simulate(plan, ray_address=args.ray_address, verbose=args.verbose, on_record=progress)
    finally:
        bar.close()
    files = write_report(plan.out)
    _print_summary(files.summary)
    print(f"written: {files.html}, {files.csv}, {files.json}")
    return 0
