"""A small CNN that scores generated samples (the paper's evaluation classifier)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Classifier(nn.Module):
    """Two conv blocks and an MLP head; input ``(B, C, H, W)`` in [0, 1], output logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 32) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes,
                       "image_size": image_size, "width": width}
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.head = nn.Sequential(
            nn.Dropout(0.3), nn.Linear(2 * width * (image_size // 4) ** 2, 128), nn.ReLU(),
            nn.Dropout(0.3), nn.Linear(128, num_classes))

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features (used for a Frechet distance in feature space)."""
        return self.head[:-1](self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def random_shift(x: Tensor, pixels: int = 2) -> Tensor:
    """Translate each image by up to ``pixels`` in x and y (zero padding): cheap augmentation."""
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, [pixels] * 4)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n))
    rows = (torch.arange(h)[None, :] + dy[:, None])          # (n, h)
    cols = (torch.arange(w)[None, :] + dx[:, None])          # (n, w)
    batch = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def non_digit_images(x: Tensor) -> Tensor:
    """Images that show no object, built from a real batch ``x`` (for outlier exposure).

    A mix of the batch's own pixels randomly permuted (same intensities, no shape), smooth
    random blobs, and flat images of a random grey level.
    """
    import torch.nn.functional as F

    n, ch, h, w = x.shape
    kind = torch.randint(3, (n,))
    perm = x.flatten(1)[:, torch.randperm(ch * h * w)].view_as(x)
    blobs = F.interpolate(torch.rand(n, ch, 4, 4), size=(h, w), mode="bilinear",
                          align_corners=False)
    flat = torch.rand(n, 1, 1, 1).expand_as(x)
    return torch.where((kind == 0).view(-1, 1, 1, 1), perm,
                       torch.where((kind == 1).view(-1, 1, 1, 1), blobs, flat))


def train_classifier(model: Classifier, x: Tensor, y: Tensor, steps: int, batch_size: int = 128,
                     lr: float = 1e-3, shift: int = 2, outlier_weight: float = 0.5,
                     progress: bool = True) -> list[float]:
    """Fit the classifier with cross-entropy and random shifts; returns the loss per step.

    With ``outlier_weight > 0`` it also learns to answer "no idea" -- a uniform p(y | x) -- on
    images that show no object (:func:`non_digit_images`; "outlier exposure", Hendrycks et al.
    2019). Without it a CNN's softmax on a blank or noisy image is arbitrary and often
    confident, and the entropy metric would measure that quirk rather than forgetting.
    """
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="training classifier", disable=not progress):
        idx = torch.randint(len(y), (batch_size,))
        xb = random_shift(x[idx], shift) if shift else x[idx]
        loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
        if outlier_weight > 0:  # cross-entropy to the uniform distribution on non-objects
            logp = torch.log_softmax(model(non_digit_images(x[idx]).to(device)), -1)
            loss = loss - outlier_weight * logp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
