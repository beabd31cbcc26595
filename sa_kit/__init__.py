"""sa-kit: Selective Amnesia (Heng & Soh, NeurIPS 2023) for teaching and exploration.

The method lives in four model-agnostic modules -- :mod:`sa_kit.objective` (the loss),
:mod:`sa_kit.fisher`, :mod:`sa_kit.replay`, :mod:`sa_kit.mappings` -- and one loop,
:mod:`sa_kit.forget`. Models plug in through :class:`sa_kit.objective.ForgettableModel`.
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
