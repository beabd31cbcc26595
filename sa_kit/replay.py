"""Generative replay: samples of the remembered concepts from a frozen copy of the original.

Term (2) of the SA objective needs x ~ p(x | theta*, c) for remembered c -- no real data. The
same machinery also draws the "another class" surrogate (see :mod:`sa_kit.mappings`).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with gradients off: theta* for replay and mappings."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class ModelSamples:
    """Samples ``(x, c)`` of the given classes from a frozen model, online or from a buffer.

    Args:
        frozen: the original model (use :func:`frozen_copy`); needs ``sample(c)``.
        classes: the classes to draw, uniformly.
        buffer_size: if given, draw this many samples once and serve batches from them (for
            models whose sampling is slow, e.g. diffusion); otherwise sample fresh each batch.
        sample_batch: how many samples to generate at a time when filling the buffer.
    """

    def __init__(self, frozen: nn.Module, classes: Sequence[int], buffer_size: int | None = None,
                 sample_batch: int = 256) -> None:
        if len(classes) == 0:
            raise ValueError("classes must name at least one class to sample")
        if buffer_size is not None and buffer_size <= 0:
            raise ValueError(f"buffer_size must be a positive integer or None, got {buffer_size}")
        self.frozen = frozen
        self.classes = torch.as_tensor(list(classes))
        self.device = next(frozen.parameters()).device
        self.buffer: tuple[Tensor, Tensor] | None = None
        if buffer_size is not None:
            chunks = [self._draw(min(sample_batch, buffer_size - i))
                      for i in range(0, buffer_size, sample_batch)]
            self.buffer = (torch.cat([x for x, _ in chunks]), torch.cat([c for _, c in chunks]))

    def _draw(self, n: int) -> tuple[Tensor, Tensor]:
        c = self.classes[torch.randint(len(self.classes), (n,))].to(self.device)
        with torch.no_grad():
            return self.frozen.sample(c), c

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """A batch ``(x, c)``."""
        if self.buffer is None:
            return self._draw(batch_size)
        idx = torch.randint(len(self.buffer[1]), (batch_size,))
        return self.buffer[0][idx], self.buffer[1][idx]


class GenerativeReplay(ModelSamples):
    """Term (2): x ~ p(x | theta*, c) with c uniform over the remembered classes (never c_f)."""

    def __init__(self, frozen: nn.Module, num_classes: int, forget_class: int,
                 buffer_size: int | None = None, sample_batch: int = 256) -> None:
        remembered = [k for k in range(num_classes) if k != forget_class]
        super().__init__(frozen, remembered, buffer_size, sample_batch)
