"""How well a model forgot and remembered, judged by a classifier (the paper's evaluation).

On samples generated for the forgotten class c_f: the classifier's average entropy
H(p(y | x)) (high = looks like no class; at most ln 10 = 2.303 for 10 classes) and average
p(y = c_f | x) (low = forgotten). On samples of each remembered class: the classifier's
accuracy (high = remembered).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def class_probabilities(classifier: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Softmax outputs ``(N, K)`` of the classifier, computed in batches."""
    device = next(classifier.parameters()).device
    classifier.eval()
    return torch.cat([torch.softmax(classifier(x[i:i + batch_size].to(device)), -1).cpu()
                      for i in range(0, len(x), batch_size)])


def entropy(probs: Tensor) -> Tensor:
    """Per-row entropy in nats."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def sample_per_class(model: nn.Module, classes: Sequence[int], n: int,
                     batch_size: int = 500) -> dict[int, Tensor]:
    """``n`` samples of each class from ``model.sample`` (on the CPU)."""
    device = next(model.parameters()).device
    out = {}
    for k in classes:
        parts = [model.sample(torch.full((min(batch_size, n - i),), k, device=device)).cpu()
                 for i in range(0, n, batch_size)]
        out[k] = torch.cat(parts)
    return out


def forgetting_metrics(classifier: nn.Module, samples: dict[int, Tensor], forget_class: int,
                       target_class: int | None = None) -> dict[str, Any]:
    """Metrics of the paper from per-class samples of a model.

    Returns:
        ``H`` and ``P_cf``: average entropy and p(y = c_f | x) on samples of c_f;
        ``P_target``: average p(y = target | x) on them, if ``target_class`` is given;
        ``acc_remembered``: mean accuracy over the other classes, and ``acc_per_class``.
    """
    probs = class_probabilities(classifier, samples[forget_class])
    acc = {k: float((class_probabilities(classifier, x).argmax(-1) == k).float().mean())
           for k, x in samples.items() if k != forget_class}
    out = {"H": float(entropy(probs).mean()), "P_cf": float(probs[:, forget_class].mean()),
           "acc_remembered": sum(acc.values()) / max(len(acc), 1), "acc_per_class": acc}
    if target_class is not None:
        out["P_target"] = float(probs[:, target_class].mean())
    return out


def evaluate_forgetting(model: nn.Module, classifier: nn.Module, forget_class: int,
                        num_samples: int, target_class: int | None = None) -> dict[str, Any]:
    """Sample ``num_samples`` per class from ``model`` and compute :func:`forgetting_metrics`."""
    samples = sample_per_class(model, range(model.num_classes), num_samples)
    return forgetting_metrics(classifier, samples, forget_class, target_class)


def accuracy(classifier: nn.Module, x: Tensor, y: Tensor) -> float:
    """Plain classification accuracy (e.g. on the real test split)."""
    return float((class_probabilities(classifier, x).argmax(-1) == y).float().mean())
