"""Victim networks shared by several test modules (the truth side: nothing here is seen by an attack)."""
import torch

import gradleak


def fit_with_smoothing(model, inputs, classes, num_classes, *, lr, steps, eps=0.1):
    """Train ``model`` briefly, full batch, with label smoothing ``eps``: ``inputs`` (N, ...), ``classes`` (N,)."""
    targets = torch.stack([gradleak.smooth_label(int(k), num_classes, eps, dtype=torch.float32) for k in classes])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        gradleak.soft_cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model


def batch_gradients(model, x, targets):
    """The gradients of the mean soft-target cross-entropy of a batch ``x`` with ``targets`` (B, C), and its head
    inputs: ``(gradients {name: tensor}, head inputs (B, d))``."""
    seen = {}
    hook = model.head.register_forward_hook(lambda module, inputs, output: seen.update(h=inputs[0].detach()))
    parameters = dict(model.named_parameters())
    try:
        loss = gradleak.soft_cross_entropy(model(x), targets)
    finally:
        hook.remove()
    return dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values())))), seen["h"]


def paired(found, truth):
    """``(pairs, smallest cosine)``: ``found[pairs[n]]`` (rows) is the true example ``truth[n]`` by cosine, each
    found once (or the calling test fails)."""
    cosine = torch.nn.functional.normalize(found.double(), dim=1) @ torch.nn.functional.normalize(truth.double(),
                                                                                                   dim=1).T
    pairs = cosine.argmax(dim=0)
    assert sorted(pairs.tolist()) == list(range(truth.shape[0]))
    return pairs, float(cosine[pairs, torch.arange(len(pairs))].min())


def head_with_logits(logits, *, dim=16, offset=0.0):
    """A head whose logits at its feature ``h`` are exactly ``logits`` (C,): ``(W (C, dim), h (dim,))`` in float64,
    ``h`` evenly spaced over ``[0.2, 1.5] + offset`` (an offset below -0.2 gives it both signs)."""
    h = torch.linspace(0.2, 1.5, dim, dtype=torch.float64) + offset
    return torch.outer(torch.as_tensor(logits, dtype=torch.float64), h) / h.square().sum(), h


def genuine_smoothed_mixups(labels, rest, truth):
    """``(M,)``: which of ``labels`` (M, C), equal on the classes ``rest``, are genuine smoothed mixups other than
    ``truth``: entries in [0, 1], each free class at least the rest's common share, and more than 1e-3 from
    ``truth`` (max-abs)."""
    free = [j for j in range(labels.shape[-1]) if j not in rest]
    common = labels[:, list(rest)].mean(-1, keepdim=True)
    return (((labels >= 0) & (labels <= 1)).all(-1) & (labels[:, free] >= common).all(-1)
            & ((labels - truth).abs().amax(-1) > 1e-3))
