"""Figures (matplotlib's Agg canvas, no display and no global pyplot state)."""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import ChannelStats, psnr, ssim, to_display

PathLike = Union[str, os.PathLike]


def _as_batch(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"{name} must be (C, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
    return images


def _to_rgb_array(image: torch.Tensor):
    """``(C, H, W)`` in [0, 1] -> an ``(H, W, 3)`` or ``(H, W)`` numpy array for ``imshow``."""
    array = image.detach().cpu().float()
    if array.shape[0] == 1:
        return array[0].numpy()
    if array.shape[0] != 3:
        raise ValueError(f"images need 1 or 3 channels to be drawn, got {array.shape[0]}")
    return array.permute(1, 2, 0).numpy()


def reconstruction_grid(true_images: torch.Tensor, reconstructions: Mapping[str, torch.Tensor], path: PathLike, *,
                        mean: ChannelStats = None, std: ChannelStats = None, title: Optional[str] = None,
                        row_labels: Optional[Sequence[str]] = None, tile_inches: float = 1.9, dpi: int = 150) -> str:
    """The paper's Figure 3: each true image next to every method's reconstruction, PSNR / SSIM under each tile.

    Args:
        true_images: ``(C, H, W)`` or ``(N, C, H, W)``; one row per image.
        reconstructions: ``{method name: images}``, each shaped like ``true_images``; one column per method,
            in the mapping's order.
        path: where to write the PNG (parent folders are created).
        mean, std: per-channel normalisation of the images (see :func:`gradleak.metrics.to_display`); None for
            images already in ``[0, 1]``. Images are shown and scored clamped to ``[0, 1]``.
        title: figure title; row_labels: one label per row (e.g. the true class).

    Returns:
        ``path`` as a string.
    """
    truth = _as_batch(true_images, "true_images")
    if not reconstructions:
        raise ValueError("reconstructions is empty: nothing to compare")
    columns = {}
    for name, images in reconstructions.items():
        batch = _as_batch(images, f"reconstructions[{name!r}]")
        if batch.shape != truth.shape:
            raise ValueError(f"reconstructions[{name!r}] has shape {tuple(batch.shape)}, the true images "
                             f"{tuple(truth.shape)}")
        columns[str(name)] = batch
    rows = truth.shape[0]
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} rows")
    truth_display = to_display(truth, mean, std)
    displays = {name: to_display(batch, mean, std) for name, batch in columns.items()}
    scores = {name: (psnr(shown, truth_display.to(shown.device)), ssim(shown, truth_display.to(shown.device)))
              for name, shown in displays.items()}

    height = tile_inches * 1.18 * rows + (0.4 if title else 0)
    figure, axes = new_figure(rows, 1 + len(columns), figsize=(tile_inches * (1 + len(columns)), height))
    for row in range(rows):
        tiles = [("ground truth", truth_display[row], None)]
        tiles += [(name, displays[name][row], (scores[name][0][row], scores[name][1][row])) for name in columns]
        for col, (name, image, score) in enumerate(tiles):
            ax = axes[row][col]
            shown = _to_rgb_array(image)
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if score is not None:
                value_psnr, value_ssim = float(score[0]), float(score[1])
                ax.set_xlabel(f"PSNR {value_psnr:.2f} dB\nSSIM {value_ssim:.4f}", fontsize=8)
            elif row_labels is not None:
                ax.set_xlabel(str(row_labels[row]), fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def new_figure(rows: int, columns: int, *, figsize: Tuple[float, float]) -> Tuple[Figure, np.ndarray]:
    """A figure on its own Agg canvas (not registered with pyplot) and its ``(rows, columns)`` array of axes."""
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False)


def save_figure(fig, path: PathLike, *, dpi: int = 120):
    """Lay out a figure (pyplot's or :func:`new_figure`'s), write it to ``path`` and release it (pyplot keeps every
    figure it opened alive until closed; closing one it does not know is a no-op)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# Every curve gets its own marker AND its own dash pattern, so that curves lying exactly on top of each other stay
# visible: hollow markers shrink from curve to curve (each one rings the next), dashes let the line beneath show.
CURVE_MARKERS = ("o", "s", "^", "D", "v", "P")
CURVE_DASHES = ("-", "--", ":", "-.")
_LARGEST_MARKER, _MARKER_STEP, _SMALLEST_MARKER = 10.0, 1.8, 4.0


def curve_styles(names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``Axes.plot`` keyword arguments for each of ``names`` (in order): colour, marker, dash pattern, sizes.

    The ``i``-th name gets colour ``C{i}``, marker ``CURVE_MARKERS[i % 6]`` and dashes ``CURVE_DASHES[i % 4]``,
    so up to 12 names have distinct (marker, dash) pairs. Earlier names are drawn larger and underneath.
    """
    names = list(dict.fromkeys(names))
    distinct = math.lcm(len(CURVE_MARKERS), len(CURVE_DASHES))
    if len(names) > distinct:
        raise ValueError(f"at most {distinct} curves can be told apart by marker and dashes, got {len(names)}")
    styles = {}
    for index, name in enumerate(names):
        styles[name] = dict(color=f"C{index % 10}", marker=CURVE_MARKERS[index % len(CURVE_MARKERS)],
                            linestyle=CURVE_DASHES[index % len(CURVE_DASHES)],
                            markersize=max(_LARGEST_MARKER - _MARKER_STEP * index, _SMALLEST_MARKER),
                            markerfacecolor="none", markeredgewidth=1.4, linewidth=max(2.2 - 0.3 * index, 1.2),
                            zorder=2 + index, label=name)
    return styles
