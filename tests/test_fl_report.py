"""The audit report (gradleak.fl.report): scoring, the files it writes, and the HTML in a real headless browser.

Built from hand-written records and truth (no Flower needed); the browser is Debian's `chromium`, which `.ci/run`
installs when it is missing.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradleak.fl.records import AuditRecord, TruthRecord, append_jsonl
from gradleak.fl.report import describe_label, label_structure, write_report
from gradleak.labels import mixup_label, smooth_label

C = 10


def _label(kind: str, cls: int = 3):
    if kind == "mixup":
        return mixup_label(cls, cls + 4, 0.3, C).tolist()
    return smooth_label(cls, C, 0.1 if kind == "smoothing" else 0.0).tolist()


def _config() -> dict:
    clients = [dict(partition=p, augmentation=a, batch_size=b, clip=c, examples=4)
               for p, (a, b, c) in enumerate([("none", 1, None), ("smoothing", 1, None), ("mixup", 1, 0.5),
                                              ("none", 4, None), ("smoothing", 1, 0.5)])]
    return dict(out="x", dataset="cifar10", image_size=32, network="mlp", rounds=2, lr=0.1, local_steps=1, eps=0.1,
                mixup_alpha=1.0, noise=0.0, partitioning="iid", dirichlet_alpha=0.5, server_knows_lr=True, seed=0,
                dataset_size=20, copies=1, num_clients=len(clients), clients=clients)


@pytest.fixture
def audit_folder(tmp_path) -> Path:
    """Two rounds of five clients: exact leaks (with reconstructions), a wrong answer, a batch, an unreadable reply."""
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    (tmp_path / "reconstructions").mkdir()
    (tmp_path / "truth-inputs").mkdir()
    rng = np.random.default_rng(0)
    for rnd in (1, 2):
        for partition, (kind, batch, clip) in enumerate([("none", 1, None), ("smoothing", 1, None),
                                                         ("mixup", 1, 0.5), ("none", 4, None),
                                                         ("smoothing", 1, 0.5)]):
            node = 1000 + partition
            labels = [_label(kind, cls) for cls in range(batch)] if batch > 1 else [_label(kind)]
            inputs = f"truth-inputs/round{rnd}-client{node}.npy"
            image = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
            np.save(tmp_path / inputs, image)
            clip_factor = 0.6 if clip else 1.0
            append_jsonl(tmp_path / "truth.jsonl", TruthRecord(
                round=rnd, client=node, partition=partition, batch_size=batch, labels=labels, lr=0.1, local_steps=1,
                clip_factor=clip_factor, clip=clip, augmentation=kind, inputs=inputs))
            structure = label_structure(labels[0])
            record = AuditRecord(round=rnd, client=node, determined=True, label_format=structure[0],
                                 classes=structure[1], eps=structure[2], lam=structure[3],
                                 label=(np.asarray(labels[0]) + 1e-7).tolist(), gradient_scale=-0.1 * clip_factor,
                                 scale_source="recovered" if clip else "config", lr=0.1, local_steps=1,
                                 batch_size_estimate=1, rank_limit=C, rank_one_ratio=1e-7, seconds=0.02)
            if batch > 1:
                record.determined, record.batch_size_estimate, record.message = False, 4, "rank 4: a batch"
            elif partition == 4 and rnd == 2:  # a confident wrong answer, to see it counted
                record.label = _label("smoothing", 5)
                record.classes = [5]
            elif partition == 0 and rnd == 2:
                record = AuditRecord(round=rnd, client=node, error="ValueError: NaN", seconds=0.001)
            else:
                name = f"reconstructions/round{rnd}-client{node}.npy"
                np.save(tmp_path / name, image[0] + 1e-4 * rng.normal(size=image[0].shape).astype(np.float32))
                record.reconstruction, record.reconstruction_method = name, "analytic"
            append_jsonl(tmp_path / "records.jsonl", record)
    return tmp_path


def test_outcomes_are_scored_against_the_truth(audit_folder):
    summary = write_report(audit_folder).summary
    assert summary["all"] == dict(updates=10, leaked=6, undetermined=2, error=1, unscored=0, leak_rate=0.6,
                                  **{"confident wrong": 1})
    assert summary["single_example"]["updates"] == 8 and summary["single_example"]["leaked"] == 6
    assert summary["batches_flagged"] == 2
    assert summary["by"]["augmentation"]["mixup"]["leaked"] == 2
    assert summary["by"]["clipping"]["clip 0.5"]["confident wrong"] == 1
    assert summary["reconstructions"] == 6 and summary["median_psnr"] > 60


def test_files_are_strict_json_csv_and_self_contained_html(audit_folder):
    files = write_report(audit_folder)
    json.loads(files.json.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in summary.json"))
    rows = files.csv.read_text().strip().splitlines()
    assert len(rows) == 11 and rows[0].startswith("round,client,partition")
    page = files.html.read_text()
    assert '<table id="summary">' in page and '<table id="updates">' in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == 3 + 2 * 6  # three plots, six truth / reconstruction pairs


def test_report_without_truth_is_unscored(audit_folder):
    (audit_folder / "truth.jsonl").unlink()
    (audit_folder / "config.json").unlink()
    files = write_report(audit_folder)
    assert not files.summary["scored"] and files.summary["determined"] == 7
    assert "No truth.jsonl" in files.html.read_text()


def test_report_needs_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="records.jsonl"):
        write_report(tmp_path)


@pytest.mark.parametrize("kind", ["none", "smoothing", "mixup"])
def test_true_labels_are_described_as_the_attacker_describes_them(kind):
    structure = label_structure(_label(kind))
    expected = {"none": "hard 3", "smoothing": "smoothing 3, eps 0.100", "mixup": "mixup 3+7, lam 0.300"}[kind]
    assert describe_label(*structure) == expected


def _chromium(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           *arguments], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium(audit_folder, tmp_path):
    page = write_report(audit_folder).html.resolve().as_uri()
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,1600", page)
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1280)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text, tables and plots, not a blank page
    dom = _chromium("--dump-dom", page).stdout
    summary = dom[dom.index('<table id="summary">'):]
    summary = summary[:summary.index("</table>")]
    assert summary.count("<tr>") >= 4 and "leak rate" in summary
