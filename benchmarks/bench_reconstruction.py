"""Speed of input reconstruction: analytic FCN-4 inversion and gradient-matching iterations per second.

    python benchmarks/bench_reconstruction.py [--repeats 5] [--iterations 30] [--device auto] [--threads N]

Prints one table: FCN-4 (3x64x64 -> 4096 -> 1024 -> 256 -> 17, no bias, a real ImageNet sample) recovery and
analytic inversion times (median of ``--repeats``) in float32 and float64, with the PSNR reached; and gradient
matching (Inverting Gradients: Adam on the cosine distance; DLG: L-BFGS on the L2 distance, counted per
objective evaluation) iterations per second for LeNet and ResNet18 on 32x32 CIFAR-10 samples. For reference, the
official code needed 4.18 s for FCN-4 recovery plus inversion on a GPU (paper digest, section 5.1).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradleak
from gradleak.data import denormalize, load_samples
from gradleak.metrics import psnr
from gradleak.models import build_model
from gradleak.reconstruct import invert_fully_connected, match_gradients
from gradleak.reconstruct.matching import resolve_device


def _median_seconds(fn, repeats):
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_analytic(repeats):
    images, classes = load_samples("imagenet", size=64)
    rows = []
    for dtype in (torch.float32, torch.float64):
        model = build_model("fcn4", 17, seed=0).to(dtype)
        x = images[0].to(dtype)
        label = gradleak.smooth_label(int(classes[0]) % 17, 17, 0.2717, dtype=dtype)
        gradients = gradleak.single_example_gradients(model, x, label)
        recover = lambda: gradleak.recover_from_gradients(model, gradients, label_format="smoothing")
        recovery_seconds, res = _median_seconds(recover, repeats)
        invert = lambda: invert_fully_connected(model, gradients, res, input_shape=x.shape)
        inversion_seconds, out = _median_seconds(invert, repeats)
        shown = denormalize(torch.stack([out, x]).to(torch.float64), "imagenet")
        rows.append((f"FCN-4 analytic, {str(dtype)[6:]}", recovery_seconds, inversion_seconds,
                     psnr(shown[0], shown[1])))
    return rows


def bench_matching(network, method, iterations, device):
    images, classes = load_samples("cifar10")
    model = build_model(network, 10, seed=0)
    label = gradleak.smooth_label(int(classes[0]), 10, 0.2, dtype=torch.float32)
    gradients = gradleak.single_example_gradients(model, images[0], label)
    match_gradients(model, gradients, (3, 32, 32), label=label, method=method, iterations=2, device=device)  # warm-up
    out = match_gradients(model, gradients, (3, 32, 32), label=label, method=method, iterations=iterations,
                          device=device)
    return out.evaluations / out.seconds, out.evaluations


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=30, help="gradient-matching iterations per measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device: {device}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}\n")

    print("| analytic inversion | recovery (s) | inversion (s) | total (s) | PSNR (dB) |")
    print("|---|---|---|---|---|")
    for name, recovery_seconds, inversion_seconds, value in bench_analytic(args.repeats):
        print(f"| {name} | {recovery_seconds:.3f} | {inversion_seconds:.3f} | "
              f"{recovery_seconds + inversion_seconds:.3f} | {value:.1f} |")

    print("\n| gradient matching (32x32) | method | objective evaluations / s | ms / evaluation |")
    print("|---|---|---|---|")
    for network in ("lenet", "resnet18"):
        for method in ("ig", "dlg"):
            iterations = args.iterations if method == "ig" else max(1, args.iterations // 10)
            rate, _ = bench_matching(network, method, iterations, device)
            print(f"| {network} | {method} | {rate:.1f} | {1000 / rate:.1f} |")


if __name__ == "__main__":
    main()
