"""A class-conditional DDPM on diffusers (chapter 2): the second ``ForgettableModel`` adapter.

The network is a diffusers ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: the
extra index is the *null class* of classifier-free guidance (Ho & Salimans 2022), used for a
random 10% of labels while training. The noise schedule is the paper's (T = 1000, linear betas
1e-4..0.02, Ho et al. 2020). The SA objective's ``-log p(x | theta, c)`` is the DDPM loss of the
official code (``ddpm/functions/losses.py: noise_estimation_loss_conditional``) at one timestep:

    neg_elbo(x, c) = sum_pixels || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) ||^2

summed over pixels and averaged over the batch (``loss_reduction = "mean"``), so the published
lambda = 10 weighs the EWC penalty as it did there. Images enter and leave the adapter in [0, 1]
(``data_range``) and are mapped to [-1, 1] inside, so the paper's "uniform noise in [-1, 1]"
surrogate is ``make_mapping("noise", ...)`` unchanged.

**Guidance.** The kit writes classifier-free guidance as
``eps_hat = eps(null) + w (eps(c) - eps(null))``; the official code writes
``(1 + s) eps(c) - s eps(null)`` with ``cond_scale`` s = 2. The two agree for ``w = 1 + s``
(:func:`guidance_from_official`): the published setting is w = 3.

**Sampling.** :meth:`ClassConditionalDDPM.sample` runs the official ``generalized_steps``
sampler (DDIM with ``eta``, x0 not clipped): ``eta = 1`` over all T steps is the 1000-step
ancestral DDPM sampler the paper evaluates with; ``eta = 0`` over a few steps is the fast DDIM
the CPU profiles use. With ``ema_decay`` set, an exponential moving average of the weights is
kept and used for sampling (the paper: 0.9999), as in the official code.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from sa_kit.checks import check_positive_int, check_weight

__all__ = ["ClassConditionalDDPM", "build_unet", "train_ddpm", "guidance_from_official",
           "antithetic_timesteps"]


def guidance_from_official(cond_scale: float) -> float:
    """The kit's guidance weight w for the official code's ``cond_scale`` s: ``w = 1 + s``.

    Official (``ddpm/models/diffusion.py: _forward_with_cond_scale``):
    ``(1 + s) eps(c) - s eps(null) = eps(null) + (1 + s) (eps(c) - eps(null))``.
    """
    return 1.0 + check_weight("cond_scale", cond_scale)


def build_unet(num_classes: int = 10, image_size: int = 32, in_channels: int = 3,
               block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
               attention_resolutions: Sequence[int] = (), norm_num_groups: int = 8,
               dropout: float = 0.0) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` with ``num_classes + 1`` class embeddings (the +1: null class).

    Args:
        num_classes: classes the model learns; index ``num_classes`` is the CFG null class.
        image_size, in_channels: the data shape ``(in_channels, image_size, image_size)``.
        block_out_channels: channels per resolution level (the paper's CIFAR-10 model:
            ``(128, 256, 256, 256)``, i.e. ch 128 with multipliers 1, 2, 2, 2).
        layers_per_block: ResNet blocks per level (the paper: 2).
        attention_resolutions: feature-map sizes with self-attention (the paper: ``(16,)``).
        norm_num_groups: GroupNorm groups (must divide every channel count).
        dropout: dropout in the ResNet blocks (the paper: 0.1).

    Returns:
        The UNet, randomly initialised with the current torch seed.
    """
    sizes = [image_size // 2 ** i for i in range(len(block_out_channels))]
    attn = [s in attention_resolutions for s in sizes]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=norm_num_groups,
        attention_head_dim=None if not any(attn) else 64, dropout=dropout,
        add_attention=bool(attention_resolutions), num_class_embeds=num_classes + 1)


def _functorch_active(t: Tensor) -> bool:
    """True inside ``torch.func`` transforms (vmap/grad), where values cannot be inspected."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def antithetic_timesteps(n: int, num_timesteps: int, device: Any = "cpu") -> Tensor:
    """``n`` timesteps in pairs ``(t, T-1-t)``, as the official training and forgetting loops draw them."""
    t = torch.randint(0, num_timesteps, (n // 2 + 1,), device=device)
    return torch.cat([t, num_timesteps - t - 1])[:n]


class ClassConditionalDDPM(nn.Module):
    """Class-conditional DDPM with classifier-free guidance; implements ``ForgettableModel``.

    Args:
        unet: a ``UNet2DModel`` from :func:`build_unet` (``num_class_embeds = num_classes + 1``).
        num_classes: number of real classes.
        num_train_timesteps, beta_start, beta_end: the DDPM noise schedule (Ho et al. 2020).
        guidance_scale: CFG weight w used by :meth:`sample` (>= 0; the paper: 3 = 1 + cond_scale 2).
        num_inference_steps, eta: the sampler (``generalized_steps``: eta 0 = DDIM, eta 1 over
            all T steps = the ancestral DDPM sampler of the paper's evaluation).
        ema_decay: keep an exponential moving average of the weights for sampling (None: off).
        clip_sample: clip the predicted x0 to [-1, 1] in every sampling step. The official
            sampler does not (False, the default); the small, briefly trained CPU models draw
            visibly cleaner digits with it, so the ``cpu``/``ci`` profiles turn it on.
    """

    loss_reduction = "mean"        # official: the DDPM loss is averaged over the batch

    def __init__(self, unet: UNet2DModel, num_classes: int = 10, num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, guidance_scale: float = 3.0,
                 num_inference_steps: int = 20, eta: float = 0.0,
                 ema_decay: float | None = None, clip_sample: bool = False) -> None:
        super().__init__()
        if unet.config.num_class_embeds != num_classes + 1:
            raise ValueError(f"unet must have num_class_embeds = num_classes + 1 = "
                             f"{num_classes + 1} (the +1 is the null class), got "
                             f"{unet.config.num_class_embeds}")
        self.unet, self.num_classes = unet, num_classes
        self.null_class = num_classes
        c, s = unet.config.in_channels, unet.config.sample_size
        self.data_shape, self.data_range = (c, s, s), (0.0, 1.0)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                       beta_start=beta_start, beta_end=beta_end,
                                       beta_schedule="linear", clip_sample=False)
        # abar_t = prod_{s<=t} (1 - beta_s); not saved with the weights (derived from the config)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(),
                             persistent=False)
        self.guidance_scale = check_weight("guidance_scale", guidance_scale)
        self.num_inference_steps = check_positive_int("num_inference_steps", num_inference_steps)
        self.eta = check_weight("eta", eta)
        self.clip_sample = bool(clip_sample)
        self.ema_decay = None if ema_decay is None else check_weight("ema_decay", ema_decay)
        # the EMA copy is a sub-module (saved and cached with the weights) but never trained
        self.ema_unet = copy.deepcopy(unet).requires_grad_(False) if ema_decay else None
        # diffusers' private keys (e.g. ``_use_default_values``, a set) would make cache keys
        # differ from run to run; keep only the architecture
        arch = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        self.config = {"unet": arch, "num_classes": num_classes,
                       "schedule": [num_train_timesteps, beta_start, beta_end],
                       **({"ema": True} if ema_decay else {})}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def requires_grad_(self, requires_grad: bool = True) -> "ClassConditionalDDPM":
        """Switch gradients of the trained UNet only; the EMA copy never trains."""
        self.unet.requires_grad_(requires_grad)
        return self

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * theta`` (official ``models/ema.py``)."""
        if self.ema_unet is None:
            return
        for e, p in zip(self.ema_unet.parameters(), self.unet.parameters()):
            e.mul_(self.ema_decay).add_(p.detach(), alpha=1 - self.ema_decay)

    def check_labels(self, c: Any, name: str = "c", allow_null: bool = False) -> Tensor:
        """``c`` as a long tensor of class indices, or a ValueError naming ``name``."""
        c = torch.as_tensor(c, device=self.alphas_cumprod.device)
        if c.is_floating_point() or c.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices, got dtype {c.dtype}")
        high = self.num_classes + (1 if allow_null else 0)
        if not _functorch_active(c) and c.numel() and (c.min() < 0 or c.max() >= high):
            raise ValueError(f"{name} must hold classes in 0..{high - 1} (this model has "
                             f"{self.num_classes} classes), got values {c.unique().tolist()}")
        return c.long()

    def draw_noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """All randomness of :meth:`neg_elbo`: antithetic timesteps ``(B,)`` and eps ~ N(0, I)."""
        return antithetic_timesteps(x.shape[0], self.num_train_timesteps, x.device), \
            torch.randn_like(x)

    def eps_loss(self, x: Tensor, c: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Per-sample ``sum_pixels ||eps - eps_theta(x_t, t, c)||^2``; x in [0, 1], shape (B,)."""
        x0 = 2 * x - 1                                              # [0, 1] -> [-1, 1]
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps            # q(x_t | x_0), eq. (4)
        pred = self.unet(x_t, t, class_labels=c).sample
        return ((pred - eps) ** 2).flatten(1).sum(1)                # eq. (14), per sample

    def neg_elbo(self, x: Tensor, c: Any, noise: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The DDPM loss at one timestep per sample, ``(B,)`` (see module docstring).

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            c: class indices ``(B,)`` in ``0..num_classes`` (``num_classes`` = null class).
            noise: ``(t, eps)`` from :meth:`draw_noise`; drawn here if None.
        """
        c = self.check_labels(c, allow_null=True)
        t, eps = noise if noise is not None else self.draw_noise(x)
        return self.eps_loss(x, c, t, eps)

    def guided_eps(self, x_t: Tensor, t: Tensor, c: Tensor, guidance_scale: float,
                   unet: nn.Module | None = None) -> Tensor:
        """CFG: eps(null) + w (eps(c) - eps(null)), both in one batched UNet call."""
        unet = unet or self.unet
        if guidance_scale == 1.0:
            return unet(x_t, t, class_labels=c).sample
        null = torch.full_like(c, self.null_class)
        both = unet(torch.cat([x_t, x_t]), t, class_labels=torch.cat([c, null])).sample
        eps_c, eps_u = both.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    @torch.no_grad()
    def sample(self, c: Any, guidance_scale: float | None = None,
               num_inference_steps: int | None = None, eta: float | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw x ~ p(x | theta, c) with guided ``generalized_steps``; ``(B, C, H, W)`` in [0, 1].

        Args:
            c: class indices ``(B,)`` in ``0..num_classes-1``.
            guidance_scale: CFG weight w >= 0 (default: the model's; 0 = unconditional).
            num_inference_steps, eta: the sampler (defaults: the model's). ``eta=1`` with
                ``num_inference_steps=T`` is the official 1000-step ancestral sampler.
            generator: optional torch generator for x_T and the sampler's noise.
        """
        w = check_weight("guidance_scale",
                         self.guidance_scale if guidance_scale is None else guidance_scale)
        eta = check_weight("eta", self.eta if eta is None else eta)
        c = self.check_labels(c)
        steps = check_positive_int("num_inference_steps",
                                   num_inference_steps or self.num_inference_steps)
        sampler = DDIMScheduler.from_config(self.scheduler.config, clip_sample=self.clip_sample,
                                            set_alpha_to_one=True)
        sampler.set_timesteps(steps)
        device = self.alphas_cumprod.device
        x = torch.randn((len(c), *self.data_shape), generator=generator,
                        device="cpu" if generator is None else generator.device).to(device)
        unet = self.ema_unet if self.ema_unet is not None else self.unet
        was_training = self.training
        self.eval()
        for t in sampler.timesteps:                                 # x_T ~ N(0, I) -> x_0
            eps = self.guided_eps(x, t.to(device), c, w, unet)
            x = sampler.step(eps, t, x, eta=eta, generator=generator).prev_sample
        self.train(was_training)
        return ((x + 1) / 2).clamp(0, 1)


def train_ddpm(model: ClassConditionalDDPM, x: Tensor, y: Tensor, steps: int,
               batch_size: int = 128, lr: float = 2e-4, label_dropout: float = 0.1,
               grad_clip: float | None = 1.0, checkpoint_dir: str | Path | None = None,
               checkpoint_every: int = 500, progress: bool = True) -> list[float]:
    """Fit the DDPM as the official ``train.py`` does (Ho et al. 2020, Algorithm 1).

    The loss is :meth:`~ClassConditionalDDPM.neg_elbo` averaged over the batch, with antithetic
    timesteps, labels replaced by the null class with probability ``label_dropout`` (CFG), the
    gradient norm clipped, and the EMA updated after every step.

    Args:
        model: the adapter; trained in place.
        x, y: training images ``(N, C, H, W)`` in [0, 1] and labels ``(N,)``.
        steps, batch_size, lr, grad_clip: Adam settings.
        label_dropout: probability of replacing a label by the null class.
        checkpoint_dir: if set, a checkpoint is written every ``checkpoint_every`` steps and at
            the end; a call with an existing checkpoint resumes from it.

    Returns:
        The loss of every step (including the resumed ones).
    """
    from sa_kit.train import train_loop

    device = next(model.parameters()).device

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(len(y), (batch_size,))
        c = y[idx].to(device)
        drop = torch.rand(batch_size, device=device) < label_dropout
        c = torch.where(drop, torch.full_like(c, model.null_class), c)  # null class for CFG
        return model.neg_elbo(x[idx].to(device), c).mean()              # Algorithm 1

    run_key = {"model": model.config, "steps": steps, "batch_size": batch_size, "lr": lr,
               "label_dropout": label_dropout, "n": len(y), "ema": model.ema_decay}
    return train_loop(model, batch_loss, steps=steps, lr=lr, desc="training DDPM",
                      grad_clip=grad_clip, after_step=lambda step: model.update_ema(),
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                      run_key=run_key, progress=progress)
