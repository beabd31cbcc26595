"""Evaluation classifiers: the paper's (primary) and an outlier-aware one (a second view).

* :class:`MNISTClassifier` -- the official evaluator of the MNIST experiments
  (``vae/model.py: Classifier``): two 5x5 convolutions of 10 and 20 channels with batch norm,
  dropout, and a 320-50-10 head, trained plainly with cross-entropy. It scores the chapter-1
  samples and, on RGB input resized to 28x28, the offline digits of chapter 2. The published
  H / P(c_f) numbers were measured with this network.
* :func:`cifar_resnet` -- the CIFAR-10 evaluator: a ResNet-34, as the official
  ``ddpm/train_classifier.py`` fine-tunes (ImageNet weights when they can be loaded).
* :class:`OutlierAwareClassifier` -- the kit's own CNN trained with *outlier exposure*
  (Hendrycks et al. 2019) to answer "no idea" (uniform) on images without an object. Not the
  paper's evaluator: a second, labelled view of how "featureless" forgotten samples are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MNISTClassifier", "OutlierAwareClassifier", "cifar_resnet", "train_classifier",
           "random_shift", "non_digit_images"]


class MNISTClassifier(nn.Module):
    """The paper's MNIST classifier; input ``(B, C, H, W)`` in [0, 1], output logits.

    Images that are not ``28x28`` are resized to it (bilinear), so the same network scores the
    16x16 RGB digits of chapter 2 (``in_channels=3``). ``embed`` gives the 50-d features of the
    penultimate layer (for the Frechet distance and the diversity measure).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.config = {"arch": "mnist-cnn-10-20-320-50", "in_channels": in_channels,
                       "num_classes": num_classes}
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.bn2 = nn.BatchNorm2d(20)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.bn2(self.conv2(x))), 2))
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.dropout(self.embed(x), training=self.training))


class OutlierAwareClassifier(nn.Module):
    """Two conv blocks and an MLP head, for training with outlier exposure (a second view)."""

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
        """Penultimate features."""
        return self.head[:-1](self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _ResNet(nn.Module):
    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net, self.num_classes = net, num_classes
        self.config = {"arch": "resnet34", "num_classes": num_classes}

    def embed(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.fc(self.embed(x))


def cifar_resnet(num_classes: int = 10, pretrained: bool = True) -> nn.Module:
    """ResNet-34 for CIFAR-10, as the official evaluator; ImageNet weights if they load.

    Offline, or when the weights cannot be fetched, it starts from random weights (and says so).
    """
    from torchvision.models import ResNet34_Weights, resnet34

    from sa_kit.data import offline
    net = None
    if pretrained and not offline():
        try:
            net = resnet34(weights=ResNet34_Weights.DEFAULT)
        except Exception as e:  # no network, blocked host, ...
            print(f"ResNet-34 ImageNet weights unavailable ({type(e).__name__}); random init")
    net = net or resnet34(weights=None)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return _ResNet(net, num_classes)


def random_shift(x: Tensor, pixels: int = 2) -> Tensor:
    """Translate each image by up to ``pixels`` in x and y (zero padding): cheap augmentation."""
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
    n, ch, h, w = x.shape
    kind = torch.randint(3, (n,))
    perm = x.flatten(1)[:, torch.randperm(ch * h * w)].view_as(x)
    blobs = F.interpolate(torch.rand(n, ch, 4, 4), size=(h, w), mode="bilinear",
                          align_corners=False)
    flat = torch.rand(n, 1, 1, 1).expand_as(x)
    return torch.where((kind == 0).view(-1, 1, 1, 1), perm,
                       torch.where((kind == 1).view(-1, 1, 1, 1), blobs, flat))


OFFICIAL_EPOCH = 938   # steps of batch 64 in one epoch of the 60,000 MNIST training digits


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, steps: int, batch_size: int = 64,
                     lr: float = 1e-4, lr_decay_every: int | None = 5 * OFFICIAL_EPOCH,
                     shift: int = 0, outlier_weight: float = 0.0,
                     checkpoint_dir: str | None = None, progress: bool = True) -> list[float]:
    """Fit a classifier with cross-entropy (Adam); returns the loss per step.

    The defaults are the official recipe of the paper's evaluator (``vae/train_classifier.py``):
    cross-entropy only, no augmentation, Adam 1e-4, batch 64, the learning rate divided by 10
    every 5 epochs of MNIST (counted in steps, so a smaller data set gets the same training).
    ``shift > 0`` adds random translations; ``outlier_weight > 0`` adds outlier exposure --
    cross-entropy to the uniform distribution on :func:`non_digit_images` -- which only
    :class:`OutlierAwareClassifier`, the second view, uses.
    """
    from sa_kit.train import train_loop

    device = next(model.parameters()).device

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(len(y), (batch_size,))
        xb = random_shift(x[idx], shift) if shift else x[idx]
        loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
        if outlier_weight > 0:  # cross-entropy to the uniform distribution on non-objects
            logp = torch.log_softmax(model(non_digit_images(x[idx]).to(device)), -1)
            loss = loss - outlier_weight * logp.mean()
        return loss

    return train_loop(model, batch_loss, steps=steps, lr=lr, desc="training classifier",
                      lr_decay_every=lr_decay_every, checkpoint_dir=checkpoint_dir,
                      run_key={"n": len(y), "batch_size": batch_size, "shift": shift,
                               "outlier_weight": outlier_weight}, progress=progress)
