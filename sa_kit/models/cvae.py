"""The one-hot conditional VAE of the paper's MNIST experiments (chapter 1).

Encoder q(z | x, c) and decoder p(x | z, c) are MLPs 784-512-256 with a z=8 latent; the label
enters both as a one-hot vector; the decoder is Bernoulli. Its negative ELBO,

    -ELBO(x, c) = E_{q(z|x,c)}[-log p(x | z, c)] + KL(q(z | x, c) || N(0, I)),

is the ``-log p(x | theta, c)`` of the SA objective: per sample, the binary cross-entropy summed
over the 784 pixels plus the KL term, and summed over the batch (``loss_reduction = "sum"``),
exactly the official ``vae/model.py: loss_function``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConditionalVAE(nn.Module):
    """One-hot conditional VAE with a Bernoulli decoder; implements ``ForgettableModel``."""

    loss_reduction = "sum"        # official: BCE and KL summed over the whole batch

    def __init__(self, x_dim: int = 784, h_dims: tuple[int, int] = (512, 256), z_dim: int = 8,
                 num_classes: int = 10) -> None:
        super().__init__()
        h1, h2 = h_dims
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.data_shape, self.data_range = (1, 28, 28), (0.0, 1.0)  # what sample() returns
        self.config = {"x_dim": x_dim, "h_dims": list(h_dims), "z_dim": z_dim,
                       "num_classes": num_classes}
        self.fc1 = nn.Linear(x_dim + num_classes, h1)   # encoder
        self.fc2 = nn.Linear(h1, h2)
        self.fc_mu = nn.Linear(h2, z_dim)
        self.fc_logvar = nn.Linear(h2, z_dim)
        self.fc4 = nn.Linear(z_dim + num_classes, h2)   # decoder
        self.fc5 = nn.Linear(h2, h1)
        self.fc6 = nn.Linear(h1, x_dim)

    def _onehot(self, c: Tensor) -> Tensor:
        if c.is_floating_point() and c.dim() == 2:   # already a (relaxed) one-hot: chapter 4
            return c.to(self.fc1.weight.dtype)
        classes = torch.arange(self.num_classes, device=c.device)
        return (c.long()[:, None] == classes).to(self.fc1.weight.dtype)  # vmap-friendly one-hot

    def encode(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.cat([x.flatten(1), self._onehot(c)], 1)
        h = F.relu(self.fc2(F.relu(self.fc1(h))))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode_logits(self, z: Tensor, c: Tensor) -> Tensor:
        h = torch.cat([z, self._onehot(c)], 1)
        return self.fc6(F.relu(self.fc5(F.relu(self.fc4(h)))))

    def draw_noise(self, x: Tensor) -> tuple[Tensor]:
        """The reparameterisation noise eps ~ N(0, I), one row per sample."""
        return (torch.randn(x.shape[0], self.z_dim, device=x.device, dtype=x.dtype),)

    def neg_elbo(self, x: Tensor, c: Tensor, noise: tuple[Tensor] | None = None) -> Tensor:
        """Per-sample negative ELBO in nats, shape ``(B,)``; x in [0, 1], c class indices."""
        (eps,) = noise if noise is not None else self.draw_noise(x)
        mu, logvar = self.encode(x, c)
        z = mu + eps * torch.exp(0.5 * logvar)                    # z ~ q(z | x, c)
        logits = self.decode_logits(z, c)
        rec = F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)  # KL(q || N(0, I))
        return rec + kl

    @torch.no_grad()
    def sample(self, c: Tensor) -> Tensor:
        """Decoder means for z ~ N(0, I): images ``(B, 1, 28, 28)`` in [0, 1]."""
        c = torch.as_tensor(c, device=self.fc1.weight.device)
        z = torch.randn(c.shape[0], self.z_dim, device=c.device)
        return torch.sigmoid(self.decode_logits(z, c)).view(-1, 1, 28, 28)


def train_cvae(model: ConditionalVAE, x: Tensor, y: Tensor, steps: int, batch_size: int = 128,
               lr: float = 1e-3, checkpoint_dir: str | None = None,
               progress: bool = True) -> list[float]:
    """Fit the cVAE by maximising the ELBO (Adam); returns the loss per step (nats per sample).

    With ``checkpoint_dir`` an interrupted training resumes where it stopped.
    """
    from sa_kit.train import train_loop

    device = next(model.parameters()).device

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(len(y), (batch_size,))
        return model.neg_elbo(x[idx].to(device), y[idx].to(device)).mean()

    return train_loop(model, batch_loss, steps=steps, lr=lr, desc="training cVAE",
                      run_key={"n": len(y), "batch_size": batch_size},
                      checkpoint_dir=checkpoint_dir, progress=progress)
