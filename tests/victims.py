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
