"""Train the paper's small networks on the data that ships offline, so that experiments can use trained weights.

The paper's trained checkpoints live on Google Drive; these stand-ins are trained here, on CPU, in minutes:

* LeNet on ``"mnist5000"`` (1x28x28, 5,000 images) or ``"digits"`` (8x8 upsampled to 16x16, 1,797 images);
* LeNet or ResNet18 fitted on the 20 bundled ``"cifar10"`` / ``"cifar100"`` samples until confident (they are
  memorised, which is the regime that matters for label recovery: a confident network).

Augmentations: ``"smoothing"`` (label smoothing with ``eps``), ``"mixup"`` (mixup of each batch with a permuted
copy, ``lam ~ U(0, 1)``), ``"none"`` (hard labels). A checkpoint is a dict::

    {"model": name, "num_classes": C, "kwargs": {...build_model kwargs...}, "state_dict": ...,
     "augmentation": ..., "eps": ..., "dataset": ..., "image_size": ..., "channels": ...,
     "epochs": ..., "lr": ..., "seed": ..., "train_accuracy": ..., "train_loss": ...}

:func:`load_checkpoint` reads these, and bare state dicts (or ``{"net": state_dict}``, as in the official
code's checkpoints) when told the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .client import soft_cross_entropy
from .data import DATASETS, load_samples
from .models import MODELS, build_model

__all__ = ["AUGMENTATIONS", "TrainConfig", "default_config", "train", "load_checkpoint", "train_experiment"]

AUGMENTATIONS = ("smoothing", "mixup", "none")
PathLike = Union[str, Path]

#: Input side length used for each dataset when training (None: the dataset's own).
TRAIN_IMAGE_SIZE: Dict[str, Optional[int]] = {"digits": 16}


@dataclass(frozen=True)
class TrainConfig:
    """Defaults that make each (network, dataset) pair reach a confident fit quickly on CPU."""

    epochs: int
    lr: float
    batch_size: int


def default_config(network: str, dataset: str) -> TrainConfig:
    """Epochs, Adam learning rate and batch size for ``network`` on ``dataset``."""
    if dataset in ("cifar10", "cifar100", "imagenet", "mnist", "fashion_mnist"):  # 20 samples: memorise them
        return TrainConfig(epochs=300 if network == "lenet" else 60, lr=1e-3 if network == "lenet" else 1e-3,
                           batch_size=20)
    if dataset == "digits":
        return TrainConfig(epochs=15, lr=3e-3, batch_size=64)
    return TrainConfig(epochs=4, lr=3e-3, batch_size=64)


def _model_kwargs(network: str, channels: int, image_size: int) -> Dict[str, Any]:
    if network == "lenet":
        return {"channels": channels, "image_size": image_size}
    if network in ("resnet18", "resnet50", "alexnet"):
        return {"channels": channels}
    if network == "fcn4":
        return {"channels": channels, "image_size": image_size}
    raise ValueError(f"unknown network {network!r}; choose one of {sorted(MODELS)}")


def _targets(labels: torch.Tensor, num_classes: int, augmentation: str, eps: float) -> torch.Tensor:
    """Soft targets ``(B, C)`` for integer ``labels`` (B,): one-hot smoothed by ``eps`` (0 for "none")."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)
    if augmentation == "smoothing":
        return onehot * (1.0 - eps) + eps / num_classes
    return onehot


def _check_train_args(network: str, dataset: str, augmentation: str, eps: float, epochs: int, lr: float,
                      batch_size: int) -> None:
    if network not in MODELS:
        raise ValueError(f"unknown network {network!r}; choose one of {sorted(MODELS)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing eps must lie in [0, 1), got {eps}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
              ) -> Tuple[float, float]:
    """``(accuracy, mean max-softmax confidence)`` of ``model`` (eval mode) on ``images`` (N, ...)."""
    correct, confidence = 0, 0.0
    for start in range(0, images.shape[0], batch_size):
        probs = torch.softmax(model(images[start:start + batch_size]), dim=-1)
        correct += int((probs.argmax(-1) == labels[start:start + batch_size]).sum())
        confidence += float(probs.max(-1).values.sum())
    return correct / images.shape[0], confidence / images.shape[0]


def train(network: str = "lenet", dataset: str = "mnist5000", *, augmentation: str = "smoothing", eps: float = 0.1,
          epochs: Optional[int] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
          seed: int = 0, out: Optional[PathLike] = None, image_size: Optional[int] = None,
          init: Optional[str] = None, max_samples: Optional[int] = None, progress: bool = True,
          head_bias: bool = False) -> Path:
    """Train ``network`` on the built-in samples of ``dataset`` (Adam, soft-target cross-entropy) and save it.

    Args:
        network: a :data:`gradleak.models.MODELS` name ("lenet", "resnet18", ...).
        dataset: a built-in dataset (:func:`gradleak.data.load_samples`), e.g. "mnist5000", "digits", "cifar10".
        augmentation: "smoothing" (targets smoothed by ``eps``), "mixup" (each batch mixed with a permuted copy,
            ``lam ~ U(0, 1)`` per batch) or "none" (hard labels).
        eps: the label smoothing of the training targets.
        epochs, lr, batch_size: default from :func:`default_config`.
        seed: seeds the initialisation, the shuffling and the mixup draws.
        out: the checkpoint file (``.pt``) or a folder for ``{network}-{dataset}-{augmentation}.pt``;
            default ``./checkpoints``.
        image_size: input side (default: the dataset's, 16 for "digits").
        init: the initialisation before training; None: the paper's for the network (U(-0.5, 0.5) for LeNet,
            which trains its sigmoids well, PyTorch's for the ResNets); "paper" or "default" to force one.
        max_samples: train on the first ``max_samples`` images only (for quick tests).
        progress: tqdm bar over epochs.
        head_bias: give the head a bias (batch label recovery reads the class mass from its gradient).

    Returns:
        The path of the saved checkpoint (see the module docstring for its contents). The network is trained
        in train mode (BatchNorm batch statistics) and evaluated and saved after switching to eval mode.
    """
    config = default_config(network, dataset)
    epochs = config.epochs if epochs is None else int(epochs)
    lr = config.lr if lr is None else float(lr)
    batch_size = config.batch_size if batch_size is None else int(batch_size)
    _check_train_args(network, dataset, augmentation, eps, epochs, lr, batch_size)
    info = DATASETS[dataset]
    image_size = TRAIN_IMAGE_SIZE.get(dataset) or info.image_size if image_size is None else int(image_size)
    images, labels = load_samples(dataset, size=image_size)
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    kwargs = dict(_model_kwargs(network, info.channels, image_size), **({"head_bias": True} if head_bias else {}))
    model = build_model(network, info.num_classes, init=init, seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.RandomState(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    count = images.shape[0]
    last_loss = math.nan
    bar = tqdm(range(epochs), desc=f"train {network}/{dataset}/{augmentation}", disable=not progress)
    for _ in bar:
        model.train()
        order = torch.randperm(count, generator=generator)
        total, seen = 0.0, 0
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            x, target = images[index], _targets(labels[index], info.num_classes, augmentation, eps)
            if augmentation == "mixup" and x.shape[0] > 1:
                lam = float(rng.uniform(0.0, 1.0))
                perm = torch.randperm(x.shape[0], generator=generator)
                x = (1.0 - lam) * x + lam * x[perm]
                target = (1.0 - lam) * target + lam * target[perm]
            loss = soft_cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * x.shape[0]
            seen += x.shape[0]
        last_loss = total / seen
        bar.set_postfix(loss=f"{last_loss:.4f}")
    model.eval()
    accuracy, confidence = _accuracy(model, images, labels)
    path = Path("checkpoints" if out is None else out)
    if path.suffix not in (".pt", ".pth"):
        path = path / f"{network}-{dataset}-{augmentation}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network, "num_classes": info.num_classes, "kwargs": kwargs,
                "state_dict": model.state_dict(), "augmentation": augmentation, "eps": eps, "dataset": dataset,
                "image_size": image_size, "channels": info.channels, "epochs": epochs, "lr": lr, "seed": seed,
                "batch_size": batch_size, "train_samples": count, "train_accuracy": accuracy,
                "train_confidence": confidence, "train_loss": last_loss}, path)
    return path


def _state_dict_of(blob: Any) -> Dict[str, torch.Tensor]:
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        return blob["state_dict"]
    if isinstance(blob, dict) and isinstance(blob.get("net"), dict):   # the official code's checkpoints
        return blob["net"]
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    raise ValueError("the file holds neither a gradleak checkpoint nor a state dict "
                     "(expected keys 'state_dict' or 'net', or a name -> tensor mapping)")


def load_checkpoint(path: PathLike, *, network: Optional[str] = None, num_classes: Optional[int] = None,
                    strict: bool = True, **kwargs) -> nn.Module:
    """A network in eval mode from a gradleak checkpoint or a user's state dict.

    Args:
        path: a file written by :func:`train`, or a ``torch.save``-d state dict (optionally ``{"net": ...}``
            or ``{"state_dict": ...}``).
        network: the :data:`gradleak.models.MODELS` name; required for bare state dicts, otherwise it must match
            the checkpoint's.
        num_classes: C; default: the checkpoint's, or the output size of the state dict's ``head.weight``.
        strict: passed to ``load_state_dict``.
        **kwargs: builder options (``channels=``, ``image_size=``, ``stem=``) overriding the checkpoint's.

    Returns:
        The model, in eval mode, with ``model.checkpoint_info`` holding the checkpoint's metadata
        (everything but the weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = _state_dict_of(blob)
    meta = {k: v for k, v in blob.items() if k not in ("state_dict", "net")} if "model" in blob else {}
    name = meta.get("model", network)
    if name is None:
        raise ValueError(f"{str(path)!r} is a bare state dict: pass network= (one of {sorted(MODELS)})")
    if network is not None and network != name:
        raise ValueError(f"the checkpoint holds a {name!r}, not a {network!r}")
    if num_classes is None:
        num_classes = meta.get("num_classes")
    if num_classes is None:
        if "head.weight" not in state:
            raise ValueError("cannot infer num_classes: the state dict has no 'head.weight'; pass num_classes=")
        num_classes = int(state["head.weight"].shape[0])
    build_kwargs = dict(meta.get("kwargs", {}))
    build_kwargs.update(kwargs)
    if "head.bias" in state:
        build_kwargs.setdefault("head_bias", True)
    model = build_model(name, int(num_classes), seed=0, **build_kwargs)
    model.load_state_dict(state, strict=strict)
    model.eval()
    model.checkpoint_info = dict(meta, path=str(path), model=name, num_classes=int(num_classes), kwargs=build_kwargs)
    return model


def train_experiment(*, dataset: str = "mnist5000", network: str = "lenet", seed: int = 0,
                     out: Optional[PathLike] = None, quick: bool = False, progress: bool = True,
                     augmentation: str = "smoothing", eps: float = 0.1, epochs: Optional[int] = None,
                     lr: Optional[float] = None, head_bias: bool = False, **_ignored) -> Dict[str, Any]:
    """CLI entry (``gradleak experiment train``): train and report. ``quick`` trains 1 epoch on 500 images."""
    path = train(network, dataset, augmentation=augmentation, eps=eps,
                 epochs=1 if quick and epochs is None else epochs, lr=lr, seed=seed,
                 out=out if out is not None else "checkpoints", max_samples=500 if quick else None,
                 progress=progress, head_bias=head_bias)
    info = load_checkpoint(path).checkpoint_info
    return {"checkpoint": str(path), "train_accuracy": info["train_accuracy"],
            "train_confidence": info["train_confidence"], "train_loss": info["train_loss"]}
