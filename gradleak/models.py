"""The paper's networks (FCN-4, LeNet, AlexNet, ResNet18, ResNet50) and their initialisations.

Every network is a :class:`Classifier`: ``model.body`` maps an input batch to the head's input ``h`` (B, d) and
``model.head`` is the final ``nn.Linear`` (d -> C), bias-free unless ``head_bias=True``::

    model.features(x)  # (B, d), the head's input
    model(x)           # (B, C) logits == model.head(model.features(x))

``model.head`` is the last ``nn.Linear`` in ``model.named_modules()`` order, which is how
:func:`gradleak.head.find_head` finds it. Written from the paper's description of its networks and its
official code's choices; torchvision is not used.

Initialisation (:func:`initialize`, also used by every constructor):

* ``"paper"``: every parameter ~ U(-0.5, 0.5), the official code's ``_weights_init``.
* ``"default"``: PyTorch's defaults (Linear and conv weights ~ kaiming_uniform(a=sqrt(5)), i.e.
  U(+-1/sqrt(fan_in)), biases U(+-1/sqrt(fan_in)), norm layers weight 1 bias 0); ResNets use
  kaiming_normal(fan_out, relu) for their convolutions, as torchvision does.
* ``None``: the paper's choice for that network (FCN-4 default, LeNet paper, AlexNet paper, ResNets default).

:func:`build_model` returns a network by name in ``eval()`` mode (BatchNorm running statistics, no dropout), as
in the paper.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ._checks import positive_int

__all__ = [
    "Classifier", "FullyConnected", "LeNet", "AlexNet", "ResNet", "BasicBlock", "Bottleneck",
    "fcn", "fcn4", "lenet", "alexnet", "resnet18", "resnet50",
    "INITIALIZERS", "initialize", "MODELS", "build_model",
]

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# --------------------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------------------

def _paper_init(model: nn.Module, generator: Optional[torch.Generator]) -> None:
    """Every parameter ~ U(-0.5, 0.5) (the official code's ``_weights_init``)."""
    for parameter in model.parameters():
        nn.init.uniform_(parameter, -0.5, 0.5, generator=generator)


def _fan_in_uniform(module: nn.Module, generator: Optional[torch.Generator]) -> None:
    """PyTorch's default for Linear and conv layers: weight and bias ~ U(+-1/sqrt(fan_in))."""
    bound = module.weight[0].numel() ** -0.5
    nn.init.uniform_(module.weight, -bound, bound, generator=generator)
    if module.bias is not None:
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def _kaiming_normal_fan_out(module: nn.Module, generator: Optional[torch.Generator]) -> None:
    """torchvision's ResNet convolutions: weight ~ kaiming_normal(mode="fan_out", nonlinearity="relu"), bias 0."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


_CONV_INITS: Dict[str, Callable[[nn.Module, Optional[torch.Generator]], None]] = {
    "fan_in_uniform": _fan_in_uniform,
    "kaiming_normal_fan_out": _kaiming_normal_fan_out,
}


def _reset_with_seed_from(module: nn.Module, generator: Optional[torch.Generator]) -> None:
    """Call ``module.reset_parameters()``; with a generator, its random draws come from a seed drawn from it."""
    if generator is None:
        module.reset_parameters()
        return
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.reset_parameters()


def _default_init(model: nn.Module, generator: Optional[torch.Generator]) -> None:
    """PyTorch's default initialisation, made seedable; ``model.default_conv_init`` may pick another conv rule."""
    conv_init = _CONV_INITS[getattr(model, "default_conv_init", "fan_in_uniform")]
    for module in model.modules():
        if isinstance(module, _CONVOLUTIONS):
            conv_init(module, generator)
        elif isinstance(module, nn.Linear):
            _fan_in_uniform(module, generator)
        elif next(module.parameters(recurse=False), None) is not None:
            if not hasattr(module, "reset_parameters"):
                raise TypeError(f"cannot apply the default initialisation to {type(module).__name__}: "
                                "it has parameters but no reset_parameters() method")
            _reset_with_seed_from(module, generator)


INITIALIZERS: Dict[str, Callable[[nn.Module, Optional[torch.Generator]], None]] = {
    "paper": _paper_init,
    "default": _default_init,
}


def initialize(model: nn.Module, init: Optional[str] = None, generator: Optional[torch.Generator] = None
               ) -> nn.Module:
    """Re-initialise every parameter of ``model`` in place and reset its BatchNorm running statistics.

    Args:
        model: any module.
        init: a key of :data:`INITIALIZERS` (``"paper"``: U(-0.5, 0.5) everywhere; ``"default"``: PyTorch's
            defaults), or None for ``model.paper_init`` (the paper's choice for a :class:`Classifier`,
            ``"default"`` for other modules).
        generator: source of the random draws (on the parameters' device); None uses torch's global RNG.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    scheme = getattr(model, "paper_init", "default") if init is None else init
    if scheme not in INITIALIZERS:
        raise ValueError(f"unknown init {scheme!r}; choose one of {sorted(INITIALIZERS)} or None")
    with torch.no_grad():
        INITIALIZERS[scheme](model, generator)
    for module in model.modules():
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return model


# --------------------------------------------------------------------------------------------------------------
# The common shape of every network
# --------------------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """``forward(x) = head(features(x))`` with ``features(x) = body(x)``, shape (B, d), and head d -> C.

    Usable as is to wrap any ``body`` (B, ...) -> (B, d); the subclasses below build theirs and override
    ``_check_input`` to turn bad inputs into clear errors.

    Class attributes:
        paper_init: the initialisation the paper uses for this network (``init=None`` picks it).
        default_conv_init: the convolution rule of the ``"default"`` initialisation.
    """

    paper_init: ClassVar[str] = "default"
    default_conv_init: ClassVar[str] = "fan_in_uniform"

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        if not isinstance(body, nn.Module) or not isinstance(head, nn.Linear):
            raise TypeError(f"body must be an nn.Module and head an nn.Linear, got {type(body).__name__} and "
                            f"{type(head).__name__}")
        super().__init__()
        self.body = body
        self.head = head

    @property
    def feature_dim(self) -> int:
        """d, the head's input size."""
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        """C, the number of logits."""
        return self.head.out_features

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for inputs the body cannot take (no check by default)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input ``h``, shape ``(B, d)``."""
        self._check_input(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape ``(B, C)``."""
        return self.head(self.features(x))


def _check_images(x: torch.Tensor, channels: int, model: str) -> Tuple[int, int]:
    """Check ``x`` is an image batch ``(B, channels, H, W)``; return ``(H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model} input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{model} expects images of shape (B, {channels}, H, W), got {tuple(x.shape)}")
    return x.shape[2], x.shape[3]


# --------------------------------------------------------------------------------------------------------------
# Fully connected networks
# --------------------------------------------------------------------------------------------------------------

class FullyConnected(Classifier):
    """Fully connected ReLU network: ``body = Sequential(Flatten, Linear, ReLU, ..., Linear, ReLU)``, head Linear.

    ``layer_sizes = [n_0, n_1, ..., n_L, C]``: the input (any shape ``(B, ...)`` with ``n_0`` entries per example)
    is flattened, passes ``L`` hidden Linear+ReLU layers, and the head maps ``n_L = d`` to ``C``. For an analytic
    layer-wise inversion, :attr:`hidden_layers` lists the body's Linear layers in order (each followed by a ReLU),
    then comes ``head``.

    Args:
        layer_sizes: at least two positive sizes.
        bias: biases in every layer.
        head_bias: bias in the head; None follows ``bias``.
        init, generator: see :func:`initialize`; the paper uses PyTorch's default for FCN-4.
    """

    paper_init: ClassVar[str] = "default"

    def __init__(self, layer_sizes: Sequence[int], *, bias: bool = False, head_bias: Optional[bool] = None,
                 init: Optional[str] = None, generator: Optional[torch.Generator] = None) -> None:
        sizes = [positive_int(n, "each layer size") for n in layer_sizes]
        if len(sizes) < 2:
            raise ValueError(f"layer_sizes needs at least an input size and a class count, got {list(layer_sizes)}")
        layers: List[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(n_in, n_out, bias=bias), nn.ReLU()]
        head = nn.Linear(sizes[-2], sizes[-1], bias=bias if head_bias is None else head_bias)
        super().__init__(nn.Sequential(*layers), head)
        self.in_features = sizes[0]
        initialize(self, init, generator)

    @property
    def hidden_layers(self) -> List[nn.Linear]:
        """The body's Linear layers, input side first (each is followed by a ReLU)."""
        return [m for m in self.body if isinstance(m, nn.Linear)]

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FullyConnected input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x[0].numel() != self.in_features:
            raise ValueError(f"FullyConnected expects (B, ...) inputs with {self.in_features} entries per example, "
                             f"got shape {tuple(x.shape)}")


# fcn(layer_sizes, *, bias=False, head_bias=None, init=None, generator=None)
fcn = FullyConnected


def fcn4(num_classes: int, image_size: int = 64, channels: int = 3, bias: bool = False, *,
         head_bias: Optional[bool] = None, init: Optional[str] = None,
         generator: Optional[torch.Generator] = None) -> FullyConnected:
    """The paper's FCN-4: ``channels*image_size^2 -> 4096 -> 1024 -> 256 -> C``, ReLU, no biases by default.

    Input ``(B, channels, image_size, image_size)`` (default 3x64x64 = 12288 entries); d = 256.
    Default init: PyTorch's (the paper's choice for FCN-4).
    """
    size = positive_int(image_size, "image_size")
    inputs = positive_int(channels, "channels") * size * size
    return FullyConnected([inputs, 4096, 1024, 256, positive_int(num_classes, "num_classes")], bias=bias,
                          head_bias=head_bias, init=init, generator=generator)


# --------------------------------------------------------------------------------------------------------------
# LeNet and AlexNet
# --------------------------------------------------------------------------------------------------------------

class LeNet(Classifier):
    """The DLG / paper LeNet for ``(B, channels, image_size, image_size)`` inputs.

    Conv(ch->12, k5, s2, p2)-Sigmoid, Conv(12->12, k5, s2, p2)-Sigmoid, Conv(12->12, k5, s1, p2)-Sigmoid, flatten,
    head Linear(d -> C) with ``d = 12 * ceil(image_size / 4)^2``: 768 for 32x32, 588 for 28x28. The convolutions
    have biases; the head has none unless ``head_bias``. Default init: U(-0.5, 0.5) (the paper's).
    """

    paper_init: ClassVar[str] = "paper"

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 32, *, head_bias: bool = False,
                 init: Optional[str] = None, generator: Optional[torch.Generator] = None) -> None:
        positive_int(channels, "channels")
        side = -(-positive_int(image_size, "image_size") // 4)
        body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, stride=2, padding=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, stride=2, padding=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, stride=1, padding=2), nn.Sigmoid(),
            nn.Flatten(),
        )
        super().__init__(body, nn.Linear(12 * side * side, positive_int(num_classes, "num_classes"), bias=head_bias))
        self.channels = channels
        self.image_size = image_size
        initialize(self, init, generator)

    def _check_input(self, x: torch.Tensor) -> None:
        if _check_images(x, self.channels, "LeNet") != (self.image_size, self.image_size):
            raise ValueError(f"this LeNet was built for {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape)}; pass image_size= to build it for another size")


# lenet(num_classes, channels=3, image_size=32, *, head_bias=False, init=None, generator=None)
lenet = LeNet


class AlexNet(Classifier):
    """torchvision-style AlexNet for ``(B, channels, H, W)`` inputs with ``H, W >= 63`` (224x224 in the paper).

    Body: conv11/s4/p2 (64)-ReLU-maxpool3/s2, conv5/p2 (192)-ReLU-maxpool3/s2, conv3/p1 (384)-ReLU,
    conv3/p1 (256)-ReLU, conv3/p1 (256)-ReLU-maxpool3/s2, AdaptiveAvgPool(6x6), flatten, Dropout,
    Linear 9216->4096, ReLU, Dropout, Linear 4096->4096, ReLU. Head Linear 4096 -> C (d = 4096).
    Smaller inputs leave nothing for the last max-pool, so they raise a ValueError.
    Default init: U(-0.5, 0.5) (the paper's).
    """

    paper_init: ClassVar[str] = "paper"
    min_image_size: ClassVar[int] = 63

    def __init__(self, num_classes: int, channels: int = 3, *, head_bias: bool = False,
                 init: Optional[str] = None, generator: Optional[torch.Generator] = None) -> None:
        positive_int(channels, "channels")
        convolutions = nn.Sequential(
            nn.Conv2d(channels, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
            nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(),
        )
        body = nn.Sequential(OrderedDict(
            convolutions=convolutions, pool=nn.AdaptiveAvgPool2d((6, 6)), flatten=nn.Flatten(),
            classifier=classifier,
        ))
        super().__init__(body, nn.Linear(4096, positive_int(num_classes, "num_classes"), bias=head_bias))
        self.channels = channels
        initialize(self, init, generator)

    def _check_input(self, x: torch.Tensor) -> None:
        if min(_check_images(x, self.channels, "AlexNet")) < self.min_image_size:
            raise ValueError(f"AlexNet needs images of at least {self.min_image_size}x{self.min_image_size}, got "
                             f"{tuple(x.shape)}; resize them (e.g. load_samples(..., size=64))")


# alexnet(num_classes, channels=3, *, head_bias=False, init=None, generator=None)
alexnet = AlexNet


# --------------------------------------------------------------------------------------------------------------
# ResNets
# --------------------------------------------------------------------------------------------------------------

def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Bias-free ``kernel_size`` conv with "same" padding, then BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualBlock(nn.Module):
    """``relu(residual(x) + shortcut(x))``; the shortcut is a 1x1 conv + BN when the shape changes.

    Subclasses set ``expansion`` (output channels = ``planes * expansion``) and build the residual branch.
    """

    expansion: ClassVar[int]

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.residual = self._residual(in_planes, planes, stride)
        changes_shape = stride != 1 or in_planes != out_planes
        self.shortcut = _conv_bn(in_planes, out_planes, 1, stride) if changes_shape else nn.Identity()
        self.relu = nn.ReLU()

    def _residual(self, in_planes: int, planes: int, stride: int) -> nn.Sequential:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet18/34); the first carries the stride."""

    expansion: ClassVar[int] = 1

    def _residual(self, in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(_conv_bn(in_planes, planes, 3, stride), nn.ReLU(), _conv_bn(planes, planes, 3))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand by 4 (ResNet50 and deeper)."""

    expansion: ClassVar[int] = 4

    def _residual(self, in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            _conv_bn(in_planes, planes, 1), nn.ReLU(),
            _conv_bn(planes, planes, 3, stride), nn.ReLU(),
            _conv_bn(planes, planes * self.expansion, 1),
        )


def _stem(kind: str, channels: int) -> nn.Sequential:
    """``"cifar"``: 3x3 conv stride 1, no max-pool; ``"imagenet"``: 7x7 conv stride 2 and 3x3/s2 max-pool."""
    if kind == "cifar":
        return nn.Sequential(_conv_bn(channels, 64, 3), nn.ReLU())
    if kind == "imagenet":
        return nn.Sequential(_conv_bn(channels, 64, 7, stride=2), nn.ReLU(),
                             nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    raise ValueError(f"unknown stem {kind!r}; choose 'cifar' or 'imagenet'")


class ResNet(Classifier):
    """A ResNet for ``(B, channels, H, W)`` inputs of any size: stem, four stages, global average pool, head.

    Stage ``i`` has ``depths[i]`` blocks of width 64, 128, 256, 512 (times ``block.expansion``), stride 1 then 2.
    ``body`` is ``Sequential(stem, layer1, layer2, layer3, layer4, pool, flatten)``; d = ``512 * block.expansion``.
    Default init: kaiming_normal(fan_out) convs, BatchNorm weight 1 bias 0, PyTorch's Linear default.
    """

    paper_init: ClassVar[str] = "default"
    default_conv_init: ClassVar[str] = "kaiming_normal_fan_out"

    def __init__(self, block: Type[ResidualBlock], depths: Sequence[int], num_classes: int, *, stem: str = "cifar",
                 channels: int = 3, head_bias: bool = False, init: Optional[str] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        positive_int(channels, "channels")
        if len(depths) != 4:
            raise ValueError(f"depths must give the block count of the 4 stages, got {list(depths)}")
        stages: List[Tuple[str, nn.Module]] = [("stem", _stem(stem, channels))]
        in_planes = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            strides = [1 if index == 0 else 2] + [1] * (positive_int(depth, "each depth") - 1)
            blocks = []
            for stride in strides:
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            stages.append((f"layer{index + 1}", nn.Sequential(*blocks)))
        body = nn.Sequential(OrderedDict(stages + [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]))
        super().__init__(body, nn.Linear(in_planes, positive_int(num_classes, "num_classes"), bias=head_bias))
        self.channels = channels
        initialize(self, init, generator)

    def _check_input(self, x: torch.Tensor) -> None:
        _check_images(x, self.channels, "ResNet")


def resnet18(num_classes: int, stem: str = "cifar", channels: int = 3, *, head_bias: bool = False,
             init: Optional[str] = None, generator: Optional[torch.Generator] = None) -> ResNet:
    """ResNet18: BasicBlock x [2, 2, 2, 2], d = 512; CIFAR stem (3x3, no max-pool) by default.

    Input ``(B, channels, H, W)``, any size (32x32 CIFAR, 224x224 ImageNet). Default init: PyTorch/torchvision's
    (the paper's choice for the untrained ResNet18).
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, stem=stem, channels=channels, head_bias=head_bias,
                  init=init, generator=generator)


def resnet50(num_classes: int, stem: str = "imagenet", channels: int = 3, *, head_bias: bool = False,
             init: Optional[str] = None, generator: Optional[torch.Generator] = None) -> ResNet:
    """ResNet50: Bottleneck x [3, 4, 6, 3], d = 2048; ImageNet stem (7x7/s2 + max-pool) by default.

    Input ``(B, channels, H, W)``, any size. Default init: PyTorch/torchvision's. The paper's code applies
    U(-0.5, 0.5) to its ResNet50, but on a network this deep the activations explode (logits ~1e9 at 64x64,
    a saturated softmax), so ``init=None`` gives the default init here; ``init="paper"`` is still available.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, stem=stem, channels=channels, head_bias=head_bias,
                  init=init, generator=generator)


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

#: Input side each network runs at when the caller does not choose (the paper's settings: FCN-4 and the
#: ImageNet-sized nets on 64x64 inputs, AlexNet needing at least 63); absent: the dataset's own size.
NETWORK_IMAGE_SIZE: Dict[str, int] = {"fcn4": 64, "alexnet": 64, "resnet50": 64}

MODELS: Dict[str, Callable[..., Classifier]] = {
    "fcn4": fcn4,
    "lenet": lenet,
    "alexnet": alexnet,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def input_options(name: str, *, channels: int, image_size: int) -> Dict[str, int]:
    """The keyword arguments of :func:`build_model` that fit network ``name`` to its inputs: the channel count,
    and the image side for the networks whose layers depend on it (FCN-4, LeNet)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    accepted = inspect.signature(MODELS[name]).parameters
    return {"channels": channels, **({"image_size": image_size} if "image_size" in accepted else {})}


def build_model(name: str, num_classes: int, *, head_bias: Optional[bool] = None, init: Optional[str] = None,
                seed: Optional[int] = None, **kwargs) -> Classifier:
    """Build a network of :data:`MODELS` in ``eval()`` mode (BatchNorm running statistics, dropout off).

    Args:
        name: ``"fcn4"``, ``"lenet"``, ``"alexnet"``, ``"resnet18"`` or ``"resnet50"``.
        num_classes: C.
        head_bias: bias in the head; None keeps the network's default (no head bias; for FCN-4 it follows
            ``bias``).
        init: ``"paper"``, ``"default"`` or None for the paper's choice for this network (see :func:`initialize`).
        seed: makes the initialisation reproducible (a private generator; torch's global CPU RNG is left as it
            was); None draws from torch's global RNG.
        **kwargs: passed to the builder, e.g. ``stem="imagenet"``, ``channels=1``, ``image_size=28``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if head_bias is not None:
        kwargs["head_bias"] = head_bias
    if seed is None:
        return MODELS[name](num_classes, init=init, **kwargs).eval()
    with torch.random.fork_rng(devices=[]):  # the layers' own constructors draw from the global RNG
        return MODELS[name](num_classes, init=init, generator=torch.Generator().manual_seed(seed), **kwargs).eval()
