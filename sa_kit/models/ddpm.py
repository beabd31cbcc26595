"""A class-conditional DDPM on diffusers (chapter 2): the third ``ForgettableModel``.

The network is a diffusers ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: the
extra index is the *null class* of classifier-free guidance (Ho & Salimans 2022), used for
a random 10% of labels while training. Training uses the ``DDPMScheduler`` noise schedule
(T = 1000, linear betas 1e-4..0.02, Ho et al. 2020); sampling uses DDIM with a guidance scale

    eps_hat(x_t, c) = eps(x_t, null) + w * (eps(x_t, c) - eps(x_t, null)).

The SA objective's ``-log p(x | theta, c)`` is replaced by the simple DDPM loss (Ho et al. 2020,
eq. 14), an ELBO up to weights and constants, at one random timestep per sample:

    neg_elbo(x, c) = mean_pixels || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) ||^2

with ``(t, eps)`` drawn by :meth:`ClassConditionalDDPM.draw_noise`. Images enter and leave the
adapter in [0, 1] (``data_range``) and are mapped to [-1, 1] inside, so the paper's
"uniform noise in [-1, 1]" surrogate is ``make_mapping("noise", ...)`` unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import Tensor, nn
from tqdm.auto import tqdm

CHECKPOINT = "ddpm_checkpoint.safetensors"


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


def check_guidance_scale(value: Any) -> float:
    """``guidance_scale`` as a float >= 0 (0: unconditional, 1: conditional, > 1: guided)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"guidance_scale must be a number >= 0, got {type(value).__name__}")
    if not (0 <= value < float("inf")):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {value}")
    return float(value)


def _functorch_active(t: Tensor) -> bool:
    """True inside ``torch.func`` transforms (vmap/grad), where values cannot be inspected."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class ClassConditionalDDPM(nn.Module):
    """Class-conditional DDPM with classifier-free guidance; implements ``ForgettableModel``.

    Args:
        unet: a ``UNet2DModel`` from :func:`build_unet` (``num_class_embeds = num_classes + 1``).
        num_classes: number of real classes.
        num_train_timesteps, beta_start, beta_end: the DDPM noise schedule (Ho et al. 2020).
        guidance_scale: CFG weight w used by :meth:`sample` (>= 0).
        num_inference_steps: DDIM steps used by :meth:`sample`.
    """

    def __init__(self, unet: UNet2DModel, num_classes: int = 10, num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02, guidance_scale: float = 2.0,
                 num_inference_steps: int = 20) -> None:
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
                                       beta_schedule="linear", clip_sample=True)
        # abar_t = prod_{s<=t} (1 - beta_s); not saved with the weights (derived from the config)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(),
                             persistent=False)
        self.guidance_scale = check_guidance_scale(guidance_scale)
        self.num_inference_steps = num_inference_steps
        # diffusers' private keys (e.g. ``_use_default_values``, a set) would make cache keys
        # differ from run to run; keep only the architecture
        arch = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        self.config = {"unet": arch, "num_classes": num_classes,
                       "schedule": [num_train_timesteps, beta_start, beta_end]}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

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
        """All randomness of :meth:`neg_elbo`: timesteps t ~ U{0..T-1} ``(B,)``, eps ~ N(0, I)."""
        t = torch.randint(0, self.num_train_timesteps, (x.shape[0],), device=x.device)
        return t, torch.randn_like(x)

    def eps_loss(self, x: Tensor, c: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Per-sample ``mean_pixels ||eps - eps_theta(x_t, t, c)||^2``; x in [0, 1], shape (B,)."""
        x0 = 2 * x - 1                                              # [0, 1] -> [-1, 1]
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps            # q(x_t | x_0), eq. (4)
        pred = self.unet(x_t, t, class_labels=c).sample
        return ((pred - eps) ** 2).flatten(1).mean(1)               # eq. (14), per sample

    def neg_elbo(self, x: Tensor, c: Any, noise: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The DDPM loss at one random timestep per sample, ``(B,)`` (see module docstring).

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            c: class indices ``(B,)`` in ``0..num_classes`` (``num_classes`` = null class).
            noise: ``(t, eps)`` from :meth:`draw_noise`; drawn here if None.
        """
        c = self.check_labels(c, allow_null=True)
        t, eps = noise if noise is not None else self.draw_noise(x)
        return self.eps_loss(x, c, t, eps)

    def guided_eps(self, x_t: Tensor, t: Tensor, c: Tensor, guidance_scale: float) -> Tensor:
        """CFG: eps(null) + w (eps(c) - eps(null)), both in one batched UNet call."""
        if guidance_scale == 1.0:
            return self.unet(x_t, t, class_labels=c).sample
        null = torch.full_like(c, self.null_class)
        both = self.unet(torch.cat([x_t, x_t]), t, class_labels=torch.cat([c, null])).sample
        eps_c, eps_u = both.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    @torch.no_grad()
    def sample(self, c: Any, guidance_scale: float | None = None,
               num_inference_steps: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw x ~ p(x | theta, c) with DDIM and classifier-free guidance; ``(B, C, H, W)`` in [0, 1].

        Args:
            c: class indices ``(B,)`` in ``0..num_classes-1``.
            guidance_scale: CFG weight w >= 0 (default: the model's).
            num_inference_steps: DDIM steps (default: the model's).
            generator: optional torch generator for x_T.
        """
        w = check_guidance_scale(self.guidance_scale if guidance_scale is None else guidance_scale)
        c = self.check_labels(c)
        steps = num_inference_steps or self.num_inference_steps
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps)
        device = self.alphas_cumprod.device
        x = torch.randn((len(c), *self.data_shape), generator=generator,
                        device="cpu" if generator is None else generator.device).to(device)
        was_training = self.training
        self.eval()
        for t in ddim.timesteps:                                    # x_T ~ N(0, I) -> x_0
            eps = self.guided_eps(x, t.to(device), c, w)
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
        self.train(was_training)
        return ((x + 1) / 2).clamp(0, 1)


def _ckpt_io():
    """The forgetting loop's checkpoint helpers (weights, Adam state, RNG, history)."""
    from sa_kit.forget import _load_checkpoint, _save_checkpoint
    return _save_checkpoint, _load_checkpoint


def train_ddpm(model: ClassConditionalDDPM, x: Tensor, y: Tensor, steps: int,
               batch_size: int = 128, lr: float = 2e-4, label_dropout: float = 0.1,
               grad_clip: float | None = 1.0, checkpoint_dir: str | Path | None = None,
               checkpoint_every: int = 500, progress: bool = True) -> list[float]:
    """Fit the DDPM with the simple loss (Ho et al. 2020, Algorithm 1) and label dropout.

    Args:
        model: the adapter; trained in place.
        x, y: training images ``(N, C, H, W)`` in [0, 1] and labels ``(N,)``.
        steps, batch_size, lr, grad_clip: Adam settings.
        label_dropout: probability of replacing a label by the null class (CFG training).
        checkpoint_dir: if set, a safetensors checkpoint is written every ``checkpoint_every``
            steps and at the end; a call with an existing checkpoint resumes from it.

    Returns:
        The loss of every step (including the resumed ones).
    """
    from sa_kit.io import config_hash

    save_ckpt, load_ckpt = _ckpt_io()
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    key = config_hash({"model": model.config, "steps": steps, "batch_size": batch_size,
                       "lr": lr, "label_dropout": label_dropout, "n": len(y)})
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    start, history = 0, {"loss": []}
    if ckpt is not None and ckpt.exists():
        _, start, history = load_ckpt(ckpt, model, opt, key)
    model.train()
    bar = tqdm(range(start, steps), desc="training DDPM", disable=not progress,
               initial=start, total=steps)
    for step in bar:
        idx = torch.randint(len(y), (batch_size,))
        c = y[idx].to(device)
        drop = torch.rand(batch_size, device=device) < label_dropout
        c = torch.where(drop, torch.full_like(c, model.null_class), c)  # null class for CFG
        loss = model.neg_elbo(x[idx].to(device), c).mean()              # Algorithm 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", refresh=False)
        if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_ckpt(ckpt, model, opt, {}, step + 1, history, key)
    bar.close()
    model.eval()
    return history["loss"]


def make_ddpm(sizes: Any, num_classes: int = 10, in_channels: int = 3,
              image_size: int = 32) -> ClassConditionalDDPM:
    """The adapter for a profile's ``DDPMSizes`` (see :mod:`sa_kit.profiles`), random weights."""
    unet = build_unet(num_classes, image_size, in_channels, sizes.block_out_channels,
                      sizes.layers_per_block, sizes.attention_resolutions, sizes.norm_num_groups)
    return ClassConditionalDDPM(unet, num_classes, guidance_scale=sizes.guidance_scale,
                                num_inference_steps=sizes.inference_steps)


def pretrained_ddpm(data: Any, sizes: Any, device: str = "cpu",
                    progress: bool = True) -> ClassConditionalDDPM:
    """Train the DDPM on ``data`` (an ``ImageData``) or load it from the cache.

    The cache key holds the model config, the training settings and the data source, so a
    changed profile retrains; an interrupted training resumes from its checkpoint.
    """
    from sa_kit.io import cache_dir, config_hash, load_or_train

    _, ch, size, _ = data.x.shape
    model = make_ddpm(sizes, len(data.classes), ch, size).to(device)
    config = {"source": data.source, "n": len(data), "steps": sizes.train_steps,
              "batch_size": sizes.batch_size, "lr": sizes.lr}
    ckpt_dir = cache_dir() / f"ddpm-train-{config_hash({**config, 'm': model.config})}"

    def train(m: ClassConditionalDDPM) -> None:
        train_ddpm(m, data.x, data.y, sizes.train_steps, sizes.batch_size, sizes.lr,
                   checkpoint_dir=ckpt_dir, progress=progress)

    return load_or_train("ddpm", model, config, train)


def pretrained_classifier(data: Any, sizes: Any, device: str = "cpu",
                          progress: bool = True) -> nn.Module:
    """The evaluation classifier, trained on the same data as the DDPM (cached)."""
    from sa_kit.io import load_or_train
    from sa_kit.models.classifier import Classifier, train_classifier

    _, ch, size, _ = data.x.shape
    clf = Classifier(ch, len(data.classes), size, width=32).to(device)
    config = {"source": data.source, "n": len(data), "steps": sizes.classifier_steps}
    return load_or_train("ddpm-classifier", clf, config, lambda m: train_classifier(
        m, data.x, data.y, sizes.classifier_steps, progress=progress))


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature rows ``a`` and ``b`` (as FID).

    ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a S_b)^{1/2}) = sum of sqrt of the eigenvalues of S_a S_b (real, >= 0)
    eig = torch.linalg.eigvals(s_a @ s_b).real.clamp_min(0)
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * eig.sqrt().sum())


def _inception_fid(real: Tensor, fake: Tensor) -> float | None:
    """torchmetrics' FID when its Inception weights can be loaded, else None."""
    from sa_kit.data import _socket_timeout, offline
    if offline():
        return None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        with _socket_timeout(10):
            fid = FrechetInceptionDistance(feature=2048, normalize=True)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        return float(fid.compute())
    except Exception:  # no weights offline, missing torch-fidelity, ...
        return None


@torch.no_grad()
def remembered_frechet(model: ClassConditionalDDPM, classifier: nn.Module, real: Tensor,
                       forget_class: int, per_class: int) -> dict[str, Any]:
    """FID on the remembered classes, or offline a clearly labelled stand-in (never "FID").

    Samples ``per_class`` images of every class except ``forget_class`` and compares them with
    the real images ``real``. With Inception weights (online): torchmetrics FID. Otherwise: the
    Frechet distance in the kit classifier's penultimate feature space.

    Returns:
        ``{"value", "label"}``.
    """
    classes = [k for k in range(model.num_classes) if k != forget_class]
    fake = torch.cat([model.sample(torch.full((per_class,), k)) for k in classes]).cpu()
    fid = _inception_fid(real, fake)
    if fid is not None:
        return {"value": fid, "label": "FID (Inception, torchmetrics)"}
    classifier.eval()
    emb = lambda x: torch.cat([classifier.embed(x[i:i + 500]) for i in range(0, len(x), 500)])  # noqa: E731
    return {"value": frechet_distance(emb(real), emb(fake)),
            "label": "classifier-feature Frechet distance (stand-in, not FID)"}
