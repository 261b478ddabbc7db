"""The command line: one-line usage errors (exit 2), strict JSON, the method a user names, help text."""
import json
import subprocess
import sys

import pytest
import torch

from gradleak.cli import build_parser, main
from gradleak.data import DATASETS
from gradleak.models import MODELS


def _run(argv, capsys):
    """(exit status, stdout, stderr) of ``gradleak argv``, whether argparse exits or the handler returns."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not standard JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("argv, names", [
    (["recover", "--eps", "1.5"], "--eps"),
    (["recover", "--lam", "2"], "--lam"),
    (["recover", "--network", "vgg"], "--network"),
    (["recover", "--dataset", "svhn"], "--dataset"),
    (["recover", "--lr", "0"], "--lr"),
    (["recover", "--sample", "999"], "--sample 999"),
    (["recover", "--sample", "-1"], "--sample"),
    (["demo", "--samples", "0"], "--samples"),
    (["experiment", "label-recovery", "--samples", "0"], "--samples"),
    (["experiment", "no-such-experiment"], "no-such-experiment"),
    (["reconstruct", "--image", "no/such/file.png", "--target", "3"], "no/such/file.png"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, names):
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and names in err and "Traceback" not in err


def test_an_image_needs_its_class(capsys, tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"")  # exists: the missing --target is the problem named
    code, _, err = _run(["reconstruct", "--network", "lenet", "--image", str(image)], capsys)
    assert code == 2 and "--target" in err and len(err.strip().splitlines()) == 1


def test_a_fresh_process_prints_no_traceback():
    done = subprocess.run([sys.executable, "-m", "gradleak.cli", "recover", "--sample", "999"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [line for line in done.stderr.strip().splitlines()
                                                if "outside the 20 built-in cifar10 samples" in line]


def test_debug_shows_the_error_itself(capsys):
    with pytest.raises(ValueError, match="outside the 20 built-in"):
        main(["--debug", "recover", "--sample", "999"])


def test_recover_prints_strict_json_with_label_and_feature(capsys):
    code, out, _ = _run(["recover", "--network", "resnet18", "--label", "mixup", "--lam", "0.3"], capsys)
    assert code == 0
    report = _strict_json(out)
    recovered, evaluation = report["recovered"], report["evaluation"]
    assert recovered["determined"] and evaluation["max_label_error"] < 1e-3
    label = torch.tensor(recovered["label"])
    assert label.shape == (10,) and abs(float(label.sum()) - 1) < 1e-5
    assert recovered["margin"] is None  # no competing answer: infinite, written as null
    # the victim gave --lam 0.3 to its second sample's class; both classes are listed with their weights
    (first, second), weights = evaluation["victim"]["classes"], recovered["class_weights"]
    assert weights[str(second)] == pytest.approx(0.3, abs=1e-5)
    assert weights[str(first)] == pytest.approx(0.7, abs=1e-5)
    assert recovered["lam_is_weight_of_class"] == max(first, second)
    assert recovered["lam"] == pytest.approx(weights[str(max(first, second))], abs=1e-6)
    assert recovered["feature"]["dim"] == 512 and recovered["feature"]["norm"] > 0


@pytest.mark.parametrize("flags, method", [([], "feature_layer"), (["--head-only"], "exact"),
                                           (["--format", "smoothing", "--method", "pso"], "pso"),
                                           (["--format", "smoothing", "--method", "lbfgs"], "lbfgs")])
def test_recover_runs_the_method_named(capsys, flags, method):
    code, out, _ = _run(["recover", "--network", "lenet"] + flags, capsys)
    assert code == 0
    recovered = _strict_json(out)["recovered"]
    assert recovered["method"] == method


@pytest.mark.parametrize("argv", [["--network", "fcn4"], ["--dataset", "mnist", "--network", "lenet"],
                                  ["--dataset", "mnist", "--network", "fcn4", "--label", "mixup"]])
def test_recover_sizes_the_input_for_each_network_and_dataset(capsys, argv):
    code, out, _ = _run(["recover"] + argv, capsys)
    assert code == 0
    report = _strict_json(out)
    assert report["recovered"]["determined"] and report["evaluation"]["max_label_error"] < 1e-3


def _help(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv + ["--help"])
    return capsys.readouterr().out


def test_help_lists_choices_defaults_and_every_option(capsys):
    text = _help(["recover"], capsys)
    assert all(name in text for name in MODELS) and all(name in text for name in DATASETS)
    assert "(default: lenet)" in text and "(default: cifar10)" in text
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices["recover"]._actions:
        assert action.help, f"no help for {action.option_strings}"


def test_experiment_help_says_which_options_apply(capsys):
    from gradleak.experiments import EXPERIMENTS

    text = _help(["experiment"], capsys)
    listing = text.split("the options each one reads", 1)[1]
    blocks, name = {}, None
    for line in listing.splitlines()[1:]:
        if line.startswith("  ") and not line.startswith("   "):  # "  name  what it is: --options"
            name = line.split()[0]
        if name:
            blocks[name] = blocks.get(name, "") + line
    assert set(EXPERIMENTS) <= set(blocks)
    for name, option in [("local-steps", "--steps"), ("dp", "--clips"), ("noise", "--stds"), ("train", "--augmentation")]:
        assert option in blocks[name]


def test_reconstruct_prints_a_table_not_tensors(capsys, tmp_path):
    code, out, _ = _run(["reconstruct", "--network", "fcn4", "--methods", "analytic", "--out", str(tmp_path),
                         "--quiet"], capsys)
    assert code == 0 and "tensor(" not in out
    row = next(line for line in out.splitlines() if line.startswith("analytic"))
    assert float(row.split()[1]) > 100  # PSNR of the exact analytic inversion, in dB


def test_reconstruct_sizes_the_network_for_the_dataset(capsys, tmp_path):
    """LeNet on MNIST: the network is built for the images' side and channels (28 x 28, one channel)."""
    code, out, err = _run(["reconstruct", "--network", "lenet", "--dataset", "mnist", "--methods", "dlg",
                           "--iterations", "1", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, err
    assert any(line.startswith("dlg/recovered") for line in out.splitlines())
