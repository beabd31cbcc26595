"""Assignment: the per-sample Fisher and the Selective Amnesia loss. Fill in the two functions.

Run the autograder from the repository root:

    .venv/bin/python -m pytest instructors/assignment/autograder.py

(``SA_SUBMISSION=path/to/your_file.py`` grades another file.) Use PyTorch only -- not
``sa_kit.fisher`` or ``sa_kit.objective``: the autograder compares your numbers with theirs.
A model here is any :class:`sa_kit.objective.ForgettableModel`: ``model.neg_elbo(x, c, noise)``
returns one ``-log p`` per sample, shape ``(B,)``; ``model.loss_reduction`` is ``"sum"`` or
``"mean"``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


def per_sample_fisher(model: Any, x: Tensor, c: Tensor, noise: tuple[Tensor, ...]
                      ) -> dict[str, Tensor]:
    """The diagonal Fisher ``F_i = mean_n (d/d theta_i  -log p(x_n | theta, c_n))^2``.

    One backward pass per sample n, with that sample's rows of ``noise`` (``noise[k][n:n+1]``),
    over every parameter that requires a gradient. Returns ``{parameter name: F}`` with each
    parameter's shape. The model's weights must be left as they were.
    """
    raise NotImplementedError("implement per_sample_fisher")


def sa_loss(model: Any, surrogate: tuple[Tensor, Tensor], replay: tuple[Tensor, Tensor] | None,
            fisher: Mapping[str, Tensor] | None, theta_star: Mapping[str, Tensor] | None,
            lmbda: float, gamma: float) -> Tensor:
    """The SA loss to minimise (a scalar tensor that can be back-propagated):

        (1) -log p(x_f | theta, c_f) over the surrogate batch
      + gamma  * (2) -log p(x_r | theta, c_r) over the replay batch      (skip if None or gamma 0)
      + lmbda  * (3) sum_i F_i (theta_i - theta*_i)^2                   (skip if None or lmbda 0)

    Terms (1) and (2) reduce the batch as ``model.loss_reduction`` says (sum or mean); the
    penalty follows the official code's scale (no 1/2) and covers the parameters in ``fisher``.
    """
    raise NotImplementedError("implement sa_loss")
