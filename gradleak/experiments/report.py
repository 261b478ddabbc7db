"""Collect the label-recovery summaries of many runs into one compact Markdown table (the README's)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Sequence, Union

COLUMNS = ("exact", "exact-head", "exact-auto", "lbfgs", "pso", "lbfgs+pso", "idlg")


def _cell(row: Dict[str, str]) -> str:
    accuracy = 100 * float(row["accuracy"])
    undetermined = int(row["undetermined"])
    return f"{accuracy:.0f}" + (f" ({undetermined}u)" if undetermined else "")


def label_recovery_table(folders: Sequence[Union[str, Path]], columns: Sequence[str] = COLUMNS) -> str:
    """One row per (dataset, network, weights, format): accuracy in % per method ("(ku)": k samples the
    attack's own diagnostics flagged undetermined), then the median ms of exact, exact-head and pso, and the
    ratio pso / exact-head (the same head-only task)."""
    rows: List[Dict[str, str]] = []
    for folder in folders:
        with open(Path(folder) / "summary.csv", newline="") as handle:
            rows += list(csv.DictReader(handle))
    keys = list(dict.fromkeys((r["dataset"], r["network"], r["weights"], r["format"]) for r in rows))
    present = [c for c in columns if any(r["method"] == c for r in rows)]
    header = ["dataset", "network", "weights", "format", "n"] + present + ["ms exact", "ms exact-head", "ms pso",
                                                                          "pso / exact-head"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        cells = {r["method"]: r for r in rows if (r["dataset"], r["network"], r["weights"], r["format"]) == key}
        n = next(iter(cells.values()))["n"]
        accuracy = [_cell(cells[c]) if c in cells else "–" for c in present]
        exact_ms = float(cells["exact"]["median_ms"]) if "exact" in cells else None
        head_ms = float(cells["exact-head"]["median_ms"]) if "exact-head" in cells else None
        pso_ms = float(cells["pso"]["median_ms"]) if "pso" in cells else None
        timing = [f"{exact_ms:.1f}" if exact_ms else "–", f"{head_ms:.1f}" if head_ms else "–", f"{pso_ms:.0f}" if pso_ms else "–",
                  f"{pso_ms / head_ms:.0f}x" if head_ms and pso_ms else "–"]
        weights = key[2] if key[2] == "untrained" else f"trained ({Path(key[2]).stem})"
        lines.append("| " + " | ".join([key[0], key[1], weights, key[3], n] + accuracy + timing) + " |")
    return "\n".join(lines)


def run(*, out: Union[str, Path] = "results", **_ignored) -> str:
    """Tabulate every label-recovery run under ``out`` (folders holding a ``summary.csv`` with a ``method``
    column) into ``out/label_recovery.md``; print and return the table."""
    root = Path(out)
    folders = sorted(p.parent for p in root.glob("*/summary.csv")
                     if "method" in p.read_text().split("\n", 1)[0].split(","))
    if not folders:
        raise ValueError(f"no label-recovery summary.csv under {root}")
    table = label_recovery_table(folders)
    (root / "label_recovery.md").write_text(table + "\n")
    print(table)
    return table
