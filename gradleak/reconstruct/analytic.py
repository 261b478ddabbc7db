"""Analytic input reconstruction for fully connected ReLU networks, from one example's gradients.

Every linear layer ``a_k = W_k x_k + b_k`` has the weight gradient ``dL/dW_k = delta_k x_k^T`` (rank one), where
``delta_k = dL/da_k``. Starting from the recovered head input ``h`` and label ``y``, the head's
``delta = softmax(W h + b) - y``; going down, ``delta_k = mask_k * (W_{k+1}^T delta_{k+1})`` with the ReLU mask
``x_{k+1} > 0`` of the activation recovered one step earlier (or, where a layer has a bias, the observed
``dL/db_k = delta_k`` directly). Each layer's input is then the least-squares solution over all usable rows::

    x_k = argmin_x ||dL/dW_k - delta_k x^T||_F = (dL/dW_k)^T delta_k / ||delta_k||^2

so the first layer's input is the example itself. Everything runs in float64; rows with ``delta_k = 0`` (dead
units) simply drop out of the sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import check_finite
from ..head import GradientsLike, named_gradients

# Rows per block for the float64 products with the (possibly huge, e.g. 4096 x 12288) first-layer gradient.
_ROW_BLOCK = 64
_PASS_THROUGH = (nn.Flatten, nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class LayerInversion:
    """How one linear layer's input was solved (layers numbered from the input, 0-based).

    Attributes:
        index: position among the network's linear layers.
        name: the layer's module name.
        in_features, out_features: the layer's shape.
        delta_source: where ``dL/da`` came from: "label" (the head: ``softmax(W h + b) - y``), "bias_grad"
            (observed bias gradient) or "backprop" (propagated from the layer above through the ReLU mask).
        usable_rows: output units with a non-zero ``delta`` (the rows the least squares used).
        rank_one_ratio: ``||dL/dW - delta x^T||_F / ||dL/dW||_F`` of the solution: ~1e-16 for exact float64
            gradients, ~1e-7 for float32, large when the recovered label/feature or the ReLU mask are wrong.
            For the head, ``x`` is the recovered feature itself (a check of the recovery, nothing solved).
        solved: True for layers whose input was solved (every layer below the head).
    """

    index: int
    name: str
    in_features: int
    out_features: int
    delta_source: str
    usable_rows: int
    rank_one_ratio: float
    solved: bool


@dataclass
class FullyConnectedInversion:
    """Result of :func:`fully_connected_inversion`.

    Attributes:
        input: the reconstructed input, shaped ``input_shape`` (or ``(in_features,)``), in the gradients' dtype.
        activations: recovered inputs of every linear layer, input first, head input last (float64, 1-D).
        layers: one :class:`LayerInversion` per linear layer, input layer first.
    """

    input: torch.Tensor
    activations: List[torch.Tensor]
    layers: List[LayerInversion]

    @property
    def worst_rank_one_ratio(self) -> float:
        return max(layer.rank_one_ratio for layer in self.layers)


@dataclass(frozen=True)
class _Stage:
    """One linear layer and whether a ReLU follows it."""

    name: str
    linear: nn.Linear
    relu_after: bool


def _leaf_modules(module: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    children = list(module.named_children())
    if not children:
        return [(prefix, module)]
    out = []
    for name, child in children:
        out.extend(_leaf_modules(child, f"{prefix}.{name}" if prefix else name))
    return out


def linear_stages(model: nn.Module) -> List[_Stage]:
    """The model as a chain of linear layers, each optionally followed by a ReLU.

    Accepts modules whose leaves, in registration order, are ``nn.Linear``, ``nn.ReLU`` and pass-through
    modules (``nn.Flatten``, ``nn.Identity``, ``nn.Dropout`` in eval mode). Raises TypeError otherwise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    stages: List[_Stage] = []
    for name, leaf in _leaf_modules(model, ""):
        if isinstance(leaf, nn.Linear):
            stages.append(_Stage(name, leaf, False))
        elif isinstance(leaf, nn.ReLU):
            if not stages or stages[-1].relu_after:
                raise TypeError(f"ReLU {name!r} does not directly follow a linear layer: the analytic inversion "
                                "needs a stack of Linear (+ReLU) layers")
            stages[-1] = _Stage(stages[-1].name, stages[-1].linear, True)
        elif isinstance(leaf, nn.Dropout):
            if leaf.training and leaf.p > 0:
                raise TypeError(f"dropout {name!r} is active: put the model in eval() mode")
        elif not isinstance(leaf, _PASS_THROUGH):
            raise TypeError(f"{type(model).__name__} is not a fully connected ReLU network: layer {name!r} is a "
                            f"{type(leaf).__name__} (allowed: Linear, ReLU, Flatten, Identity, Dropout)")
    if not stages:
        raise TypeError(f"{type(model).__name__} has no nn.Linear layer")
    if stages[-1].relu_after:
        raise TypeError("the last linear layer (the head) must produce the logits, but a ReLU follows it")
    for below, above in zip(stages, stages[1:]):
        if below.linear.out_features != above.linear.in_features:
            raise TypeError(f"layer {below.name!r} has {below.linear.out_features} outputs but the next linear "
                            f"layer {above.name!r} takes {above.linear.in_features}: not a plain stack")
    return stages


def _check_stack_matches_forward(model: nn.Module, stages: Sequence[_Stage]) -> None:
    """Verify on a random input that ``model(x)`` is the composition of the stages (catches reordered or
    skipped layers, residual connections or extra activations hidden in ``forward``)."""
    first = stages[0].linear
    param = first.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.rand(1, first.in_features, generator=generator, dtype=torch.float64).to(param.device, param.dtype)
    with torch.no_grad():
        try:
            expected = model(probe)
        except Exception:  # the model's forward needs an image-shaped input; the layer check above must do
            return
        out = probe
        for stage in stages:
            out = stage.linear(out)
            if stage.relu_after:
                out = torch.relu(out)
    if expected.shape != out.shape or not torch.allclose(expected, out, rtol=1e-4, atol=1e-5 * float(
            out.abs().max().clamp_min(1.0))):
        raise TypeError(f"{type(model).__name__}.forward is not the chain of its Linear/ReLU layers in "
                        "registration order: the analytic inversion does not apply")


def _named_gradients(model: nn.Module, gradients: GradientsLike) -> Dict[int, torch.Tensor]:
    """``{id(parameter): gradient}`` from a name-keyed mapping or a sequence aligned with ``model.parameters()``."""
    by_name = dict(model.named_parameters())
    pairs = [(by_name[name], grad) for name, grad in named_gradients(model, gradients).items()]
    out = {}
    for param, grad in pairs:
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise TypeError("every gradient must be a floating-point tensor")
        if grad.shape != param.shape:
            raise ValueError(f"a gradient has shape {tuple(grad.shape)} but its parameter has {tuple(param.shape)}")
        out[id(param)] = grad
    return out


def _least_squares_input(weight_grad: torch.Tensor, delta: torch.Tensor, name: str) -> Tuple[torch.Tensor, float]:
    """``x = G^T delta / |delta|^2`` and ``||G - delta x^T||_F / ||G||_F``, in float64.

    Works through ``G`` in row blocks copied into one reusable float64 buffer, so a 4096 x 12288 float32 gradient
    is never converted whole; rows with ``delta = 0`` contribute nothing to ``x``.

    Args:
        weight_grad: ``(out, in)`` in any float dtype; delta: ``(out,)`` float64 with at least one non-zero entry.
        name: the layer, for error messages.

    Raises:
        ValueError: ``weight_grad`` has NaN or infinite entries (detected through the sums, no extra pass).
    """
    rows, cols = weight_grad.shape
    weights = delta / delta.pow(2).sum()
    buffer = torch.empty(min(rows, _ROW_BLOCK), cols, dtype=torch.float64, device=delta.device)
    x = torch.zeros(cols, dtype=torch.float64, device=delta.device)
    for start in range(0, rows, _ROW_BLOCK):
        block = buffer[:min(_ROW_BLOCK, rows - start)]
        block.copy_(weight_grad[start:start + _ROW_BLOCK])
        x.addmv_(block.T, weights[start:start + _ROW_BLOCK])
    residual_sq = torch.zeros((), dtype=torch.float64, device=delta.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=delta.device)
    for start in range(0, rows, _ROW_BLOCK):
        block = buffer[:min(_ROW_BLOCK, rows - start)]
        block.copy_(weight_grad[start:start + _ROW_BLOCK])
        total_sq += torch.linalg.vector_norm(block).square()
        block.addr_(delta[start:start + _ROW_BLOCK], x, alpha=-1.0)
        residual_sq += torch.linalg.vector_norm(block).square()
    if not (bool(torch.isfinite(total_sq)) and bool(torch.isfinite(x).all())):
        raise ValueError(f"the gradient of {name}.weight contains NaN or infinite entries")
    ratio = float((residual_sq / total_sq).sqrt()) if float(total_sq) > 0 else float("inf")
    return x, ratio


def fully_connected_inversion(model: nn.Module, gradients: GradientsLike, res, *,
                              input_shape: Optional[Sequence[int]] = None,
                              use_bias_gradients: bool = True) -> FullyConnectedInversion:
    """Reconstruct the input of a fully connected ReLU network from one example's gradients.

    Uses only the model's parameters, the observed gradients and the recovered label and head feature.

    Args:
        model: a stack of ``nn.Linear`` layers, each hidden one optionally followed by ``nn.ReLU``
            (``nn.Flatten``, ``nn.Identity`` and eval-mode ``nn.Dropout`` allowed), with or without biases;
            the last linear layer is the head.
        gradients: ``{parameter name: gradient}`` or a sequence aligned with ``model.parameters()``; needs every
            linear layer's weight gradient (and bias gradients where the layers have biases).
        res: any object with ``.label`` ``(C,)`` and ``.feature`` ``(d,)``: the recovered label and head input
            (e.g. a :class:`gradleak.RecoveryResult`).
        input_shape: shape of the returned input (e.g. ``(3, 64, 64)``); default ``model.input_shape`` if the model
            has one, else ``(in_features,)``.
        use_bias_gradients: take ``delta_k`` from an observed bias gradient where a layer has one (exact, no
            propagation error); False propagates through the ReLU masks everywhere.

    Returns:
        :class:`FullyConnectedInversion`; ``.input`` in the gradients' dtype.

    Raises:
        TypeError: the model is not a plain fully connected (ReLU) stack.
        ValueError: missing, mis-shaped or non-finite gradients or recovery; a layer whose ``delta`` vanishes.
    """
    stages = linear_stages(model)
    _check_stack_matches_forward(model, stages)
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None) or (stages[0].linear.in_features,)
    input_shape = tuple(int(s) for s in input_shape)
    if torch.Size(input_shape).numel() != stages[0].linear.in_features:
        raise ValueError(f"input_shape {input_shape} does not have {stages[0].linear.in_features} elements")
    grads = _named_gradients(model, gradients)
    for stage in stages:
        if id(stage.linear.weight) not in grads:
            raise ValueError(f"gradients have no entry for {stage.name}.weight")
        if stage.linear.bias is not None and id(stage.linear.bias) in grads:
            check_finite(grads[id(stage.linear.bias)], f"gradient of {stage.name}.bias")
    head = stages[-1].linear
    num_classes, feature_dim = head.out_features, head.in_features
    label = getattr(res, "label", None)
    feature = getattr(res, "feature", None)
    if not isinstance(label, torch.Tensor) or not isinstance(feature, torch.Tensor):
        raise TypeError("res must have tensor attributes .label (C,) and .feature (d,)")
    if label.shape != (num_classes,):
        raise ValueError(f"res.label must have shape ({num_classes},), got {tuple(label.shape)}")
    if feature.shape != (feature_dim,):
        raise ValueError(f"res.feature must have shape ({feature_dim},), got {tuple(feature.shape)}")
    check_finite(label, "res.label")
    check_finite(feature, "res.feature")
    out_dtype = grads[id(head.weight)].dtype
    device = head.weight.device

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=torch.float64)

    # The head: nothing to solve, delta = p - y from the recovered label and feature.
    activation = f64(feature)
    logits = f64(head.weight) @ activation
    if head.bias is not None:
        logits = logits + f64(head.bias)
    delta = torch.softmax(logits, dim=0) - f64(label)
    head_grad64 = f64(grads[id(head.weight)])
    check_finite(head_grad64, f"gradient of {stages[-1].name}.weight")
    head_ratio = float((head_grad64 - torch.outer(delta, activation)).norm() / head_grad64.norm().clamp_min(1e-300))
    reports = [LayerInversion(len(stages) - 1, stages[-1].name, head.in_features, head.out_features, "label",
                              int((delta != 0).sum()), head_ratio, False)]
    activations = [activation]
    for index in range(len(stages) - 2, -1, -1):
        stage, above = stages[index], stages[index + 1]
        bias_grad = grads.get(id(stage.linear.bias)) if stage.linear.bias is not None else None
        if use_bias_gradients and bias_grad is not None:
            delta, source = f64(bias_grad), "bias_grad"
        else:
            delta = f64(above.linear.weight).T @ delta
            if stage.relu_after:
                delta = delta * (activation > 0)
            source = "backprop"
        if not bool(delta.any()):
            raise ValueError(f"layer {stage.name!r}: dL/da is zero on every unit (all ReLUs dead or a vanishing "
                             "gradient), so its input cannot be recovered")
        activation, ratio = _least_squares_input(grads[id(stage.linear.weight)].to(device), delta, stage.name)
        activations.insert(0, activation)
        reports.insert(0, LayerInversion(index, stage.name, stage.linear.in_features, stage.linear.out_features,
                                         source, int((delta != 0).sum()), ratio, True))
    return FullyConnectedInversion(input=activations[0].reshape(input_shape).to(out_dtype),
                                   activations=activations, layers=reports)


def invert_fully_connected(model: nn.Module, gradients: GradientsLike, res, *,
                           input_shape: Optional[Sequence[int]] = None,
                           use_bias_gradients: bool = True) -> torch.Tensor:
    """The reconstructed input, shaped like the model's input: :func:`fully_connected_inversion`'s ``.input``
    (call that for the per-layer report)."""
    return fully_connected_inversion(model, gradients, res, input_shape=input_shape,
                                     use_bias_gradients=use_bias_gradients).input
