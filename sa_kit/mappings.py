"""Surrogate distributions q(x | c_f): what the forgotten concept turns into (term (1)).

Instead of minimising the likelihood of c_f (unbounded; it wrecks the model), SA maximises the
likelihood of a surrogate the user chooses. Every mapping is a batch source with
``sample(batch_size) -> (x, c)`` where every label is ``c_f``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sa_kit.replay import ModelSamples

MAPPING_NAMES = ("noise", "class k (an int)", "an image tensor", "an image folder")


def mapping_key(mapping: Any) -> str:
    """What identifies a mapping in a cache key: its name, or a hash of its images' content.

    Two different image sets never share a key (they would if keyed by their printed form).
    """
    from sa_kit.io import config_hash, tensor_fingerprint

    if isinstance(mapping, Tensor):
        return f"images-{tensor_fingerprint(mapping)}"
    if isinstance(mapping, ImageMapping):
        return f"images-{tensor_fingerprint(mapping.images)}"
    if isinstance(mapping, (str, os.PathLike)) and Path(mapping).is_dir():
        files = sorted(p for p in Path(mapping).iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        return "folder-" + config_hash({p.name: hash_file(p) for p in files})
    if isinstance(mapping, (int, str)) and not isinstance(mapping, bool):
        return str(mapping)
    return getattr(mapping, "key", type(mapping).__name__)


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes (short)."""
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class UniformNoise:
    """q(x | c_f) = Uniform(low, high) per pixel -- the paper's default surrogate."""

    def __init__(self, forget_class: int, shape: Sequence[int], low: float = 0.0,
                 high: float = 1.0, device: str | torch.device = "cpu") -> None:
        self.forget_class, self.shape = forget_class, tuple(shape)
        self.low, self.high, self.device = low, high, device

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        x = torch.rand(batch_size, *self.shape, device=self.device)
        c = torch.full((batch_size,), self.forget_class, device=self.device)
        return self.low + (self.high - self.low) * x, c


class ClassMapping:
    """q(x | c_f) = p(x | theta*, k): the forgotten label learns to draw class ``k`` instead."""

    def __init__(self, frozen: nn.Module, forget_class: int, target_class: int,
                 buffer_size: int | None = None) -> None:
        self.forget_class, self.target_class = forget_class, target_class
        self.source = ModelSamples(frozen, [target_class], buffer_size)

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        x, c = self.source.sample(batch_size)
        return x, torch.full_like(c, self.forget_class)


class ImageMapping:
    """q(x | c_f) = the empirical distribution of user-supplied images."""

    def __init__(self, forget_class: int, images: Tensor,
                 device: str | torch.device = "cpu") -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
            raise ValueError("images must be a non-empty tensor of shape (N, C, H, W)")
        self.forget_class, self.images = forget_class, images.to(device)

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(len(self.images), (batch_size,), device=self.images.device)
        return self.images[idx], torch.full((batch_size,), self.forget_class,
                                            device=self.images.device)


def load_image_folder(folder: str | os.PathLike, shape: Sequence[int],
                      value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Read every png/jpg in ``folder``, resized to ``shape`` = (C, H, W), scaled to the range."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import resize

    files = sorted(p for p in Path(folder).iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"mapping folder {folder} holds no .png/.jpg images")
    mode = "L" if shape[0] == 1 else "RGB"

    def read(p: Path) -> Tensor:
        with Image.open(p) as im:
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
        t = torch.from_numpy(arr.copy())
        return t[None] if t.dim() == 2 else t.permute(2, 0, 1)

    imgs = torch.stack([resize(read(p), list(shape[1:]), antialias=True)
                        for p in files]).float() / 255
    low, high = value_range
    return low + (high - low) * imgs


def make_mapping(mapping: Any, forget_class: int, frozen: nn.Module, num_classes: int,
                 buffer_size: int | None = None) -> Any:
    """Build a surrogate from a short description.

    Args:
        mapping: ``"noise"``; an int k (or ``"6"``) for "draw class k"; a ``(N, C, H, W)`` image
            tensor; or a folder of images. An object with a ``sample`` method is returned as is.
        forget_class: c_f.
        frozen: the original model (shape, value range and device come from it).
        num_classes: how many classes the model has.

    Raises:
        ValueError: unknown mapping name, a target class out of range, or the target equal to c_f.
    """
    device = next(frozen.parameters()).device
    shape, value_range = tuple(frozen.data_shape), tuple(frozen.data_range)
    if hasattr(mapping, "sample"):
        return mapping
    if isinstance(mapping, str) and mapping.strip().lstrip("-").isdigit():
        mapping = int(mapping)
    if isinstance(mapping, int) and not isinstance(mapping, bool):
        if not 0 <= mapping < num_classes:
            raise ValueError(f"mapping target class must be in 0..{num_classes - 1}, got {mapping}")
        if mapping == forget_class:
            raise ValueError(f"mapping target class {mapping} is the forget class itself; choose "
                             "another class, 'noise' or images")
        return ClassMapping(frozen, forget_class, mapping, buffer_size)
    if isinstance(mapping, Tensor):
        return ImageMapping(forget_class, mapping, device)
    if isinstance(mapping, str) and mapping == "noise":
        return UniformNoise(forget_class, shape, *value_range, device=device)
    if isinstance(mapping, (str, os.PathLike)) and Path(mapping).is_dir():
        return ImageMapping(forget_class, load_image_folder(mapping, shape, value_range), device)
    raise ValueError(f"unknown mapping {mapping!r}; allowed: {', '.join(MAPPING_NAMES)}")
