"""The ``label-variants`` experiment (the README's gradient-matching table) and its place in the registry."""
import csv
import json

import pytest

from gradleak.experiments import EXPERIMENTS, run_experiment
from gradleak.experiments.reconstruction import LABEL_VARIANTS, run_reconstruction
from gradleak.reconstruct.matching import METHODS


def test_the_registry_holds_label_variants_and_checks_its_options(tmp_path):
    assert "label-variants" in EXPERIMENTS
    with pytest.raises(ValueError, match="valid"):
        run_experiment("label-variants", methods=["analytic"], out=str(tmp_path), quick=True, progress=False)
    with pytest.raises(ValueError, match="untrained"):
        run_experiment("label-variants", weights="ckpt/lenet.pt", out=str(tmp_path), quick=True, progress=False)


def test_quick_label_variants_writes_one_row_per_sample_and_variant_and_matches_single_runs(tmp_path):
    # the options the CLI passes (its unrelated options, e.g. formats, are ignored); 16x16 inputs keep it fast
    result = EXPERIMENTS["label-variants"](dataset="cifar10", network="lenet", seed=7, out=str(tmp_path),
                                           quick=True, progress=False, methods=["dlg", "ig"], image_size=16,
                                           formats=["hard"])
    assert (tmp_path / "label_variants.png").stat().st_size > 1000 and result["figure"].endswith(".png")
    for method in ("dlg", "ig"):
        folder = tmp_path / method
        with open(folder / "label_variants.csv") as handle:
            rows = list(csv.DictReader(handle))
        pairs = [(int(row["sample"]), row["variant"]) for row in rows]
        assert sorted(pairs) == sorted((s, v) for s in (0, 1) for v in LABEL_VARIANTS)
        summary = json.loads((folder / "label_variants.json").read_text())
        assert summary["config"]["samples"] == [0, 1] and summary["config"]["method"] == method
        assert summary["config"]["line_search"] == METHODS[method].line_search
        iterations = summary["config"]["iterations"]
        assert 1 <= iterations < METHODS[method].iterations  # the quick preset
        assert all(int(row["evaluations"]) >= 1 for row in rows)
        markdown = (folder / "label_variants.md").read_text()
        for variant in LABEL_VARIANTS:
            assert f"| {variant} |" in markdown
            psnrs = [float(row["psnr"]) for row in rows if row["variant"] == variant]
            assert summary["summary"][variant]["n"] == 2
            assert summary["summary"][variant]["psnr_mean"] == pytest.approx(sum(psnrs) / 2)
            assert result[f"{method}/{variant}"].endswith("n=2")

    # a row of the table is the single-sample reconstruction with seed + sample (what `gradleak reconstruct
    # --sample 1 --seed 8` runs), so the README's table and its one-sample command agree
    single = run_reconstruction("lenet", "cifar10", "smoothing", ["dlg"], label_variants=LABEL_VARIANTS, sample=1,
                                seed=8, iterations=iterations, size=16, progress=False, figure=False)
    with open(tmp_path / "dlg" / "label_variants.csv") as handle:
        table_rows = {row["variant"]: float(row["psnr"]) for row in csv.DictReader(handle) if row["sample"] == "1"}
    assert table_rows == pytest.approx({v: single["results"][f"dlg/{v}"]["psnr"] for v in LABEL_VARIANTS})
