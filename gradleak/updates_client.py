"""The victim side of real client updates: what one federated client sends after training on ONE example.

A server never sees a raw gradient; it sees ``update = new - old`` weights. These clients produce such updates
with the real optimisers, so that the attack (:func:`gradleak.recover_from_update`) can be measured against
what a deployment actually ships:

* :func:`sgd_update`: ``steps`` plain ``torch.optim.SGD`` steps (optionally with weight decay). One step gives
  ``-lr * (g + wd * W)``; K steps give ``-lr * sum_k (g(theta_k) + wd * W_k)``; :func:`sgd_updates` returns
  the updates after several step counts of one trajectory.
* :func:`dp_sgd_update`: one DP-SGD step by Opacus (``PrivacyEngine.make_private``, batch size 1, no Poisson
  sampling): the per-example gradient is clipped to ``max_grad_norm`` (flat clipping over all parameters) and
  Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to every entry, so
  ``update = -lr * (min(1, C / ||g||) * g + noise)``.

Ground truth (the clean gradient's norm, the clip factor, the true scale ``s`` with ``update = s * g`` before
noise) is returned next to the update for the EVALUATOR only; an attack must never read it.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .client import single_example_gradients, soft_cross_entropy

_OPACUS_MISSING = ("dp_sgd_update needs Opacus (pip install 'opacus>=1.4', or gradleak's 'test' extra: "
                   "pip install 'gradleak[test]')")


def _opacus():
    """The ``opacus`` package, imported on first use (it is an optional dependency)."""
    try:
        import opacus
    except ImportError as error:
        raise ImportError(_OPACUS_MISSING) from error
    return opacus


def _trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    return named


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    return lr


def sgd_update(model: nn.Module, x: torch.Tensor, label: torch.Tensor, *, lr: float, steps: int = 1,
               weight_decay: float = 0.0) -> Dict[str, torch.Tensor]:
    """``new - old`` weights after ``steps`` plain SGD steps on ONE example (soft-target cross-entropy).

    A deep copy of ``model`` trains (in the mode ``model`` is in: an ``eval()`` network keeps its BatchNorm
    running statistics, as :func:`gradleak.single_example_gradients` does); ``model`` itself is unchanged.
    Each step computes :func:`gradleak.single_example_gradients` at the current weights and applies
    ``torch.optim.SGD(lr=lr, weight_decay=weight_decay)`` (no momentum).

    Args:
        model: maps a ``(1, *input_shape)`` batch to ``(1, C)`` logits.
        x: ONE input without the batch dimension, e.g. ``(3, 32, 32)``.
        label: ``(C,)`` soft label summing to one.
        lr: learning rate (> 0).
        steps: local SGD steps K (>= 1) on the same example.
        weight_decay: SGD's L2 coefficient ``wd`` (the step uses ``g + wd * W``).

    Returns:
        ``{parameter name: new - old}`` for every trainable parameter, in ``named_parameters()`` order, in the
        parameters' dtype: ``-lr * (g + wd * W)`` after one step, ``-lr * sum_k (g(theta_k) + wd * W_k)`` after K.
    """
    return sgd_updates(model, x, label, lr=lr, steps=(steps,), weight_decay=weight_decay)[0]


def sgd_updates(model: nn.Module, x: torch.Tensor, label: torch.Tensor, *, lr: float, steps: Sequence[int],
                weight_decay: float = 0.0) -> List[Dict[str, torch.Tensor]]:
    """:func:`sgd_update` for several step counts along ONE trajectory (``max(steps)`` steps in all).

    The update after K steps is the same whether the client stops there or goes on, so the updates for
    ``steps = (1, 2, 3, 5, 10)`` cost 10 gradient evaluations instead of 21.

    Returns:
        one update dict per entry of ``steps``, in that order (see :func:`sgd_update`).
    """
    lr = _check_lr(lr)
    steps = list(steps)
    if not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
        raise ValueError(f"steps must be positive ints, got {steps!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be finite and non-negative, got {weight_decay}")
    client = copy.deepcopy(model)
    named = _trainable(client)
    old = {name: p.detach().clone() for name, p in named}
    optimizer = torch.optim.SGD([p for _, p in named], lr=lr, weight_decay=weight_decay)
    taken: Dict[int, Dict[str, torch.Tensor]] = {}
    for k in range(1, max(steps) + 1):
        grads = single_example_gradients(client, x, label)
        for name, p in named:
            p.grad = grads[name]
        optimizer.step()
        if k in steps:
            taken[k] = {name: p.detach() - old[name] for name, p in named}
    return [taken[k] for k in steps]


@dataclass(frozen=True)
class DPTruth:
    """What only the evaluator knows about one DP-SGD update (never given to an attack).

    Attributes:
        grad_norm: L2 norm of the clean per-example gradient over every trainable parameter (float64).
        clip_factor: ``min(1, max_grad_norm / grad_norm)``. Opacus divides by ``grad_norm + 1e-6`` instead,
            a relative difference of ``1e-6 / grad_norm``.
        scale: the true ``s`` with ``update = s * g + noise``: ``-lr * clip_factor``.
        noise_std: standard deviation of the noise on every entry of the update: ``lr * noise_multiplier *
            max_grad_norm``.
    """

    grad_norm: float
    clip_factor: float
    scale: float
    noise_std: float


def opacus_compatible(model: nn.Module) -> Tuple[nn.Module, List[str]]:
    """``model`` as Opacus accepts it, and what had to change (empty: ``model`` itself is returned).

    Opacus refuses modules it cannot compute per-example gradients for, BatchNorm above all (it mixes the
    examples of a batch). ``opacus.validators.ModuleValidator.fix`` replaces them (BatchNorm by GroupNorm);
    the result is ANOTHER network, which the attacker must then be given as well. Only done when needed.

    Returns:
        ``(module, changes)``: the fixed copy (in ``model``'s train/eval mode, dtype and device) and the
        validator's complaints, or ``(model, [])`` when Opacus accepts it as it is.
    """
    _opacus()
    from opacus.validators import ModuleValidator

    errors = _opacus_errors(copy.deepcopy(model).train())
    if not errors:
        return model, []
    fixed = ModuleValidator.fix(model).train(model.training)
    reference = next(model.parameters(), None)
    if reference is not None:   # the replacement modules are built in torch's default dtype, on the CPU
        fixed.to(device=reference.device, dtype=reference.dtype)
    remaining = _opacus_errors(copy.deepcopy(fixed).train())
    if remaining:
        raise ValueError(f"Opacus cannot train this model even after ModuleValidator.fix: {remaining}")
    return fixed, errors


def _opacus_errors(trainee: nn.Module) -> List[str]:
    """Opacus' complaints about ``trainee``, a module in ``train()`` mode (Opacus refuses eval mode)."""
    from opacus.validators import ModuleValidator

    return [str(error) for error in ModuleValidator.validate(trainee, strict=False)]


def dp_sgd_update(model: nn.Module, x: torch.Tensor, label: torch.Tensor, *, lr: float, max_grad_norm: float,
                  noise_multiplier: float, seed: int) -> Tuple[Dict[str, torch.Tensor], DPTruth]:
    """``new - old`` weights after ONE DP-SGD step by Opacus on ONE example, and the evaluator's truth.

    A deep copy of ``model`` is made private with ``opacus.PrivacyEngine().make_private(module, SGD(lr),
    DataLoader(one example, batch_size=1), noise_multiplier, max_grad_norm, poisson_sampling=False)`` (flat
    clipping, mean loss reduction over a batch of one) and takes one step; ``model`` is unchanged. Opacus
    computes per-example gradients only in training mode, so the copy trains in ``train()`` mode: the model
    must behave the same in both modes (no dropout; BatchNorm is refused by Opacus, see
    :func:`opacus_compatible`).

    Args:
        model: maps a ``(1, *input_shape)`` batch to ``(1, C)`` logits; Opacus-compatible.
        x: ONE input without the batch dimension; label: ``(C,)`` soft label summing to one.
        lr: learning rate; max_grad_norm: the clipping norm C (> 0); noise_multiplier: sigma >= 0 (the noise
            on each entry of the summed gradient has standard deviation ``sigma * C``).
        seed: seeds Opacus' noise generator (the same seed gives the same update).

    Returns:
        ``(update, truth)``: ``{parameter name: new - old}`` for every trainable parameter in
        ``named_parameters()`` order (the names of ``model``, not of Opacus' wrapper), and :class:`DPTruth`.

    Raises:
        ImportError: Opacus is not installed. ValueError: Opacus does not accept the model (run
        :func:`opacus_compatible` first), or the model has dropout.
    """
    opacus = _opacus()
    from torch.utils.data import DataLoader, TensorDataset

    lr = _check_lr(lr)
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and non-negative, got {noise_multiplier}")
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        raise ValueError("the model has dropout: Opacus trains in train() mode, where its gradient is random")
    client = copy.deepcopy(model).train()
    errors = _opacus_errors(client)
    if errors:
        raise ValueError(f"Opacus does not accept this model ({'; '.join(errors)}); gradleak.updates_client."
                         "opacus_compatible(model) returns a version it accepts (attack that one)")
    named = _trainable(client)
    clean = single_example_gradients(client, x, label)
    grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in clean.values()))
    clip_factor = min(1.0, max_grad_norm / grad_norm) if grad_norm > 0 else 1.0
    old = {name: p.detach().clone() for name, p in named}
    param = named[0][1]
    batch = TensorDataset(x.unsqueeze(0).to(device=param.device, dtype=param.dtype),
                          torch.as_tensor(label).reshape(1, -1).to(device=param.device, dtype=param.dtype))
    generator = torch.Generator(device=param.device).manual_seed(int(seed))
    private, optimizer, loader = opacus.PrivacyEngine().make_private(
        module=client, optimizer=torch.optim.SGD([p for _, p in named], lr=lr),
        data_loader=DataLoader(batch, batch_size=1), noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm), poisson_sampling=False, noise_generator=generator)
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer fire for the module output (the input needs no gradient): harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for inputs, targets in loader:
            optimizer.zero_grad()
            soft_cross_entropy(private(inputs), targets).backward()
            optimizer.step()
    # ``client`` is the module inside Opacus' wrapper: its own names, without the wrapper's "_module." prefix
    update = {name: p.detach() - old[name] for name, p in named}
    truth = DPTruth(grad_norm=grad_norm, clip_factor=clip_factor, scale=-lr * clip_factor,
                    noise_std=lr * float(noise_multiplier) * float(max_grad_norm))
    return update, truth
