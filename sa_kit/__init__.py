"""sa-kit: Selective Amnesia (Heng & Soh, NeurIPS 2023) for teaching and exploration.

The map of the package:

* the method, model-agnostic -- :mod:`~sa_kit.objective` (the loss, eq. 1-3, and the
  :class:`~sa_kit.objective.ForgettableModel` contract), :mod:`~sa_kit.fisher` (diagonal Fisher,
  fast exact estimator, the cached-Fisher policy), :mod:`~sa_kit.diffusion_fisher` (the paper's
  Fisher of a diffusion model), :mod:`~sa_kit.replay`, :mod:`~sa_kit.mappings` (surrogates),
  :mod:`~sa_kit.forget` (the forgetting loop);
* shared mechanics -- :mod:`~sa_kit.train` (one training loop, checkpoints, safe interrupts),
  :mod:`~sa_kit.metrics`, :mod:`~sa_kit.io` (caches, atomic files, fingerprints),
  :mod:`~sa_kit.checks` (input checks), :mod:`~sa_kit.profiles` (run sizes),
  :mod:`~sa_kit.plots`, :mod:`~sa_kit.widgets` (the class-conditional explorer),
  :mod:`~sa_kit.data`, :mod:`~sa_kit.cli` (the ``sa-kit`` command), :mod:`~sa_kit.demo`;
* :mod:`sa_kit.models` -- the adapters (cVAE, class-conditional DDPM), their training functions,
  and the evaluation classifiers; :mod:`sa_kit.sd` -- Stable Diffusion (adapter, pipelines,
  prompts, datasets, the training CLI, evaluation);
* :mod:`sa_kit.chapters` -- what each chapter builds and caches.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__version__ = "0.1.0"


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so that a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
