"""Stable Diffusion as a :class:`sa_kit.objective.ForgettableModel` (the third adapter).

x are VAE latents, c are CLIP text-encoder hidden states (or prompts, encoded on the fly), and
``-log p(x | theta, c)`` is replaced by the latent-diffusion loss of Rombach et al. -- the
epsilon-prediction MSE at a sampled timestep, per sample, as the official code computes it
(``sd/ldm/models/diffusion/ddpm_forget.py: p_losses``):

    neg_elbo(x, c) = mean_{latent dims} || eps - eps_theta(x_t, t, c) ||^2,
    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps   (the scheduler's ``add_noise``),
    t ~ U{0, ..., T-1},  eps ~ N(0, I)        -- ``draw_noise(x) = (t, eps)``

averaged over the batch (``loss_reduction = "mean"``), so the published lambda = 50 carries over.

Only the UNet is trained (theta); the VAE and text encoder are frozen and are not registered as
sub-modules, so ``named_parameters()`` are the UNet's (prefixed ``unet.``) and the kit's
``sa_loss``, ``ewc_penalty`` and Fisher functions apply unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sa_kit.checks import check_choice

TRAIN_METHODS = ("full", "xattn", "noxattn")


class _Frozen:
    """Holds the frozen parts outside ``nn.Module`` registration (not theta)."""

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, vae: nn.Module | None,
                 scheduler: Any) -> None:
        self.text_encoder, self.tokenizer, self.vae, self.scheduler = \
            text_encoder, tokenizer, vae, scheduler


class SDAdapter(nn.Module):
    """The Stable Diffusion UNet with the ``ForgettableModel`` interface.

    ``loss_reduction = "mean"``: the official code averages the loss over the batch.

    Args:
        unet: the ``UNet2DConditionModel`` being made to forget.
        text_encoder, tokenizer: CLIP, frozen; turn prompts into c.
        vae: frozen; only needed to decode samples into images.
        scheduler: a diffusers noise scheduler (its ``add_noise`` defines x_t above).
        sample_steps, guidance_scale: DDIM steps and classifier-free guidance of ``sample``.
    """

    loss_reduction = "mean"

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 scheduler: Any, vae: nn.Module | None = None, sample_steps: int = 50,
                 guidance_scale: float = 7.5) -> None:
        super().__init__()
        self.unet = unet
        self.frozen = _Frozen(text_encoder.requires_grad_(False).eval(), tokenizer,
                              vae.requires_grad_(False).eval() if vae is not None else None,
                              scheduler)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.sample_steps, self.guidance_scale = sample_steps, guidance_scale
        self.config = {"unet": architecture(unet)}

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "SDAdapter":
        """The adapter over ``pipe.unet`` (shared, not copied) and the pipeline's frozen parts."""
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.vae,
                   **kwargs)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """CLIP hidden states ``(B, 77, D)`` of ``prompts`` -- the condition c."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings")
        tok = self.frozen.tokenizer(list(prompts), padding="max_length", truncation=True,
                                    max_length=self.frozen.tokenizer.model_max_length,
                                    return_tensors="pt")
        enc = self.frozen.text_encoder
        ids = tok.input_ids.to(next(enc.parameters()).device)
        return enc(ids)[0].to(self.unet.dtype)

    def _condition(self, c: Any) -> Tensor:
        return c if isinstance(c, Tensor) else self.encode_prompts(c)

    def draw_noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(t, eps)``: a timestep and the Gaussian noise of each sample (batch first)."""
        t = torch.randint(0, self.num_train_timesteps, (x.shape[0],), device=x.device)
        return t, torch.randn_like(x)

    def neg_elbo(self, x: Tensor, c: Any, noise: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Per-sample latent-diffusion loss, shape ``(B,)`` (the ``l_simple`` of LDM)."""
        t, eps = noise if noise is not None else self.draw_noise(x)
        sched = self.frozen.scheduler
        x_t = sched.add_noise(x, eps, t)                           # q(x_t | x_0)
        pred = self.unet(x_t, t, encoder_hidden_states=self._condition(c)).sample
        target = eps if self.prediction_type == "epsilon" else sched.get_velocity(x, eps, t)
        return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)

    def forward(self, x: Tensor, c: Any, noise: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Same as :meth:`neg_elbo` (so that DDP/accelerate wrappers see a forward pass)."""
        return self.neg_elbo(x, c, noise)

    @torch.no_grad()
    def sample(self, c: Any, generator: torch.Generator | list | None = None) -> Tensor:
        """x ~ p(x | theta, c): DDIM latents for prompts ``c`` (classifier-free guidance)."""
        from diffusers import StableDiffusionPipeline
        f = self.frozen
        pipe = StableDiffusionPipeline(vae=f.vae, text_encoder=f.text_encoder,
                                       tokenizer=f.tokenizer, unet=self.unet,
                                       scheduler=f.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        kw = {"prompt": list(c)} if not isinstance(c, Tensor) else {"prompt_embeds": c}
        size = int(self.unet.config.sample_size) * (pipe.vae_scale_factor if f.vae else 8)
        return pipe(**kw, num_inference_steps=self.sample_steps, height=size, width=size,
                    guidance_scale=self.guidance_scale, generator=generator,
                    output_type="latent").images


def architecture(unet: nn.Module) -> dict[str, Any]:
    """The UNet's config without bookkeeping keys (``_name_or_path``, versions)."""
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


def is_cross_attention(name: str) -> bool:
    """True for the UNet's cross-attention parameters (``attn2``: text -> image)."""
    return ".attn2." in f".{name}"


# What the official ``noxattn`` leaves frozen besides cross-attention (``ddpm_forget.py:
# configure_optimizers``, itself from ESD's train-esd.py): the time embedding (``time_embed``)
# and the output layers (``out.``). Their diffusers names:
NOXATTN_FROZEN = ("time_embedding.", "conv_norm_out.", "conv_out.")


def trains_with(name: str, train_method: str) -> bool:
    """Whether the UNet parameter ``name`` trains under ``train_method`` (official selection)."""
    if train_method == "full":
        return True
    if train_method == "xattn":
        return is_cross_attention(name)
    return not (is_cross_attention(name) or name.startswith(NOXATTN_FROZEN))


def select_parameters(unet: nn.Module, train_method: str) -> list[str]:
    """Set ``requires_grad`` by ``train_method`` and return the trainable parameter names.

    Args:
        train_method: ``"full"`` (every UNet weight; the paper's celebrity runs),
            ``"xattn"`` (cross-attention only) or ``"noxattn"`` (all but cross-attention, the
            time embedding and the output layers -- exactly what the official code and ESD
            train; the paper's nudity run).

    Raises:
        ValueError: for any other ``train_method``.
    """
    check_choice("train_method", train_method, TRAIN_METHODS)
    names = []
    for name, p in unet.named_parameters():
        keep = trains_with(name, train_method)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names
