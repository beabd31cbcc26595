"""Scale is part of the method: the published lambdas must mean here what they meant there.

For each adapter, this file re-implements the official code's formulas *independently* (plain
torch, written from clear-nus/selective-amnesia, not calling the kit's loss, penalty or Fisher)
and checks, on a tiny model at a perturbed theta, that the kit's

    ratio = lambda * penalty / data terms     and     ||grad(lambda * penalty)|| / ||grad(data)||

equal the official ones to <= 1e-4 relative, at the published lambda and batch size.

* cVAE (``vae/model.py: loss_function``, ``vae/train_forget.py``, ``vae/calculate_fim.py``):
  BCE summed over pixels + KL, summed over the batch; F = mean_n g_n^2; penalty without 1/2.
* DDPM (``ddpm/functions/losses.py``, ``ddpm/runners/diffusion.py: train_forget, save_fim``):
  (eps - eps_theta)^2 summed over pixels, averaged over the batch;
  F = mean_n (grad of the loss summed over all T = 1000 timesteps)^2.
* Stable Diffusion (``sd/ldm/models/diffusion/ddpm_forget.py``, ``ddpm_fim.py``): the loss
  averaged over latent dimensions and over the batch; F as for the DDPM, on the replay set.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sa_kit.diffusion_fisher import diffusion_fisher
from sa_kit.fisher import fisher_fast
from sa_kit.models.cvae import ConditionalVAE
from sa_kit.models.ddpm import ClassConditionalDDPM, build_unet
from sa_kit.objective import ewc_penalty, sa_loss

REL = 1e-4


def _perturb(model: torch.nn.Module, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """Move every trainable weight a little off theta*; return theta* (a copy)."""
    theta_star = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * p.abs().mean().clamp_min(1e-3) * torch.randn_like(p))
    return theta_star


def _official_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                      theta_star: dict[str, torch.Tensor]) -> torch.Tensor:
    # for n, p in model.named_parameters(): loss += lmbda * (F[n] * (p - mle[n]) ** 2).sum()
    return sum((fisher[n] * (p - theta_star[n]) ** 2).sum() for n, p in params.items())


def _ratios(model: torch.nn.Module, data: torch.Tensor, penalty: torch.Tensor, lmbda: float
            ) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    g_data = torch.autograd.grad(data, params, retain_graph=True, allow_unused=True)
    g_pen = torch.autograd.grad(lmbda * penalty, params, retain_graph=True, allow_unused=True)
    norm = lambda gs: torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None))  # noqa: E731
    return float((lmbda * penalty / data).detach()), float(norm(g_pen) / norm(g_data))


def _kit_terms(model, surrogate, replay, fisher, theta_star, lmbda, gamma, draws):
    """The kit's data terms (sa_loss with lambda = 0) and penalty, on the given noise draws."""
    model.draw_noise = lambda x: next(draws)
    data = sa_loss(model, surrogate, replay, None, None, 0.0, gamma)["loss"]
    penalty = ewc_penalty(model, fisher, theta_star)
    model.draw_noise = lambda x: next(draws)
    full = sa_loss(model, surrogate, replay, fisher, theta_star, lmbda, gamma)["loss"]
    torch.testing.assert_close(full, data + lmbda * penalty, rtol=1e-5, atol=0)
    return data, penalty


def _close(kit: tuple[float, float], official: tuple[float, float]) -> None:
    for name, a, b in zip(("value ratio", "gradient ratio"), kit, official):
        assert abs(a - b) <= REL * abs(b), f"{name}: kit {a:.6g} vs official {b:.6g}"
        assert a > 0


# --- cVAE ------------------------------------------------------------------------------------

def _official_cvae_loss(m: ConditionalVAE, x: torch.Tensor, c: torch.Tensor,
                        eps: torch.Tensor) -> torch.Tensor:
    """vae/model.py: forward + loss_function (BCE on sigmoid outputs, reduction='sum')."""
    onehot = F.one_hot(c, 10).float()
    h = F.relu(m.fc1(torch.cat([x.view(-1, 784), onehot], 1)))
    h = F.relu(m.fc2(h))
    mu, log_var = m.fc_mu(h), m.fc_logvar(h)
    z = eps * torch.exp(0.5 * log_var) + mu
    h = F.relu(m.fc5(F.relu(m.fc4(torch.cat([z, onehot], 1)))))
    recon = torch.sigmoid(m.fc6(h))
    bce = F.binary_cross_entropy(recon, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
    return bce + kld


def measure_cvae() -> tuple[tuple[float, float], tuple[float, float]]:
    """``(kit, official)`` ratios (value, gradient) for the cvae at the published setting."""
    torch.manual_seed(0)
    model = ConditionalVAE(h_dims=(64, 32), z_dim=8)
    # calculate_fim.py: one generated sample at a time, its loss's squared gradient, averaged
    n_fim = 40
    c_fim = torch.randint(0, 10, (n_fim,))
    x_fim = model.sample(c_fim).detach()
    eps_fim = torch.randn(n_fim, 8)
    official_f = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(n_fim):
        model.zero_grad()
        _official_cvae_loss(model, x_fim[i:i + 1], c_fim[i:i + 1], eps_fim[i:i + 1]).backward()
        for k, p in model.named_parameters():
            official_f[k] += p.grad.detach() ** 2 / n_fim
    kit_f = fisher_fast(model, x_fim, c_fim, (eps_fim,))
    theta_star = _perturb(model)

    # train_forget.py at the published lambda = 100, gamma = 1, batch 256
    lmbda, gamma, b = 100.0, 1.0, 256
    x_f, c_f = torch.rand(b, 1, 28, 28), torch.zeros(b, dtype=torch.long)
    c_r = torch.randint(1, 10, (b,))
    x_r = model.sample(c_r).detach()
    eps_f, eps_r = torch.randn(b, 8), torch.randn(b, 8)
    data = _official_cvae_loss(model, x_f, c_f, eps_f) + \
        gamma * _official_cvae_loss(model, x_r, c_r, eps_r)
    official = _ratios(model, data, _official_penalty(dict(model.named_parameters()),
                                                      official_f, theta_star), lmbda)

    draws = iter([(eps_f,), (eps_r,)] * 2)              # the same eps, in the same order
    kit_data, kit_pen = _kit_terms(model, (x_f, c_f), (x_r, c_r), kit_f, theta_star, lmbda,
                                   gamma, draws)
    return _ratios(model, kit_data, kit_pen, lmbda), official


# --- DDPM ------------------------------------------------------------------------------------

def _tiny_ddpm() -> ClassConditionalDDPM:
    torch.manual_seed(0)
    unet = build_unet(3, image_size=8, in_channels=3, block_out_channels=(8, 16),
                      norm_num_groups=4)
    return ClassConditionalDDPM(unet, 3, num_inference_steps=2)


def _official_ddpm_loss(m: ClassConditionalDDPM, x0: torch.Tensor, t: torch.Tensor,
                        c: torch.Tensor, e: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """ddpm/functions/losses.py: noise_estimation_loss_conditional (x0 in [-1, 1])."""
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64).float()   # linear betas
    a = (1 - b).cumprod(dim=0).index_select(0, t).view(-1, 1, 1, 1)
    x = x0 * a.sqrt() + e * (1.0 - a).sqrt()
    output = m.unet(x, t, class_labels=c).sample
    per_sample = (e - output).square().sum(dim=(1, 2, 3))
    return per_sample if keepdim else per_sample.mean(dim=0)


def measure_ddpm() -> tuple[tuple[float, float], tuple[float, float]]:
    """``(kit, official)`` ratios (value, gradient) for the ddpm at the published setting."""
    model = _tiny_ddpm()
    torch.manual_seed(1)
    n, T = 3, 1000
    c_fim = torch.tensor([0, 1, 2])
    x_fim = model.sample(c_fim).detach()                    # in [0, 1]
    eps_table = torch.randn(n, T, 3, 8, 8)
    # save_fim: per sample, the loss over all T timesteps in chunks, gradient, squared
    model.eval()
    official_f = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
    for i in range(n):
        grads = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
        for chunk in torch.chunk(torch.arange(T), 20):       # --n_chunks 20
            k = len(chunk)                                   # the chunk's timesteps at once
            loss = _official_ddpm_loss(model, (2 * x_fim[i:i + 1] - 1).expand(k, -1, -1, -1),
                                       chunk, c_fim[i:i + 1].expand(k), eps_table[i, chunk],
                                       True).sum()
            model.zero_grad()
            loss.backward()
            for k, p in model.named_parameters():
                if p.requires_grad:
                    grads[k] += p.grad
        for k in official_f:
            official_f[k] += grads[k] ** 2 / n
    kit_f = diffusion_fisher(model, x_fim, c_fim, None, eps=eps_table, chunk_size=100,
                             progress=False)
    for k in official_f:
        torch.testing.assert_close(kit_f[k], official_f[k], rtol=1e-3, atol=1e-8 *
                                   float(official_f[k].abs().max()))
    theta_star = _perturb(model)

    # train_forget at the published lambda = 10, gamma = 1, batch 128
    lmbda, gamma, b = 10.0, 1.0, 128
    x_f = torch.rand(b, 3, 8, 8)                       # uniform in [-1, 1] after 2x - 1
    c_f = torch.zeros(b, dtype=torch.long)
    x_r, c_r = torch.rand(b, 3, 8, 8), torch.randint(1, 3, (b,))
    t_f, t_r = torch.randint(0, T, (b,)), torch.randint(0, T, (b,))
    e_f, e_r = torch.randn(b, 3, 8, 8), torch.randn(b, 3, 8, 8)
    data = _official_ddpm_loss(model, 2 * x_f - 1, t_f, c_f, e_f, False) + \
        gamma * _official_ddpm_loss(model, 2 * x_r - 1, t_r, c_r, e_r, False)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    official = _ratios(model, data, _official_penalty(params, official_f, theta_star), lmbda)

    draws = iter([(t_f, e_f), (t_r, e_r)] * 2)
    kit_data, kit_pen = _kit_terms(model, (x_f, c_f), (x_r, c_r), kit_f, theta_star, lmbda,
                                   gamma, draws)
    return _ratios(model, kit_data, kit_pen, lmbda), official


# --- Stable Diffusion ------------------------------------------------------------------------

def _tiny_sd():
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from sa_kit.sd.adapter import SDAdapter
    from sa_kit.sd.pipeline import TINY_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return SDAdapter(unet, torch.nn.Linear(1, 1), None, sched), sched


def _official_sd_loss(unet, x0, c, t, noise, per_sample: bool = False) -> torch.Tensor:
    """ldm p_losses: l2 loss, mean over [1, 2, 3], then mean over the batch (logvar = 0).

    ``per_sample`` keeps the per-sample means: one batch element per timestep of a sum.
    """
    ab = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - ab, 0).float()[t].view(-1, 1, 1, 1)
    x_noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = unet(x_noisy, t, encoder_hidden_states=c).sample
    loss_simple = F.mse_loss(noise, out, reduction="none").mean(dim=[1, 2, 3])
    return loss_simple if per_sample else loss_simple.mean()


def measure_sd() -> tuple[tuple[float, float], tuple[float, float]]:
    """``(kit, official)`` ratios (value, gradient) for the sd at the published setting."""
    adapter, _ = _tiny_sd()
    unet = adapter.unet
    torch.manual_seed(2)
    n, T = 2, 1000
    x_rep = torch.randn(n, 4, 4, 4)                    # replay latents
    c_rep = torch.randn(n, 77, 16)                     # their text hidden states
    eps_table = torch.randn(n, T, 4, 4, 4)
    official_f = {f"unet.{k}": torch.zeros_like(p) for k, p in unet.named_parameters()}
    for i in range(n):                                 # ddpm_fim.py: batch 1 per GPU
        grads = [torch.zeros_like(p) for p in unet.parameters()]
        for chunk in torch.chunk(torch.arange(T), 20):   # sum_t p_losses(x, c, t), in chunks
            k = len(chunk)
            per_t = _official_sd_loss(unet, x_rep[i:i + 1].expand(k, -1, -1, -1),
                                      c_rep[i:i + 1].expand(k, -1, -1), chunk,
                                      eps_table[i, chunk], per_sample=True)
            for g, gi in zip(grads, torch.autograd.grad(per_t.sum(), list(unet.parameters()))):
                g += gi
        for (k, _), g in zip(unet.named_parameters(), grads):
            official_f[f"unet.{k}"] += g ** 2 / n
    kit_f = diffusion_fisher(adapter, x_rep, c_rep, None, eps=eps_table, chunk_size=250,
                             progress=False)
    for k in official_f:
        torch.testing.assert_close(kit_f[k], official_f[k], rtol=1e-3, atol=1e-8 *
                                   float(official_f[k].abs().max()))
    theta_star = _perturb(adapter)

    lmbda, gamma, b = 50.0, 1.0, 4                     # forget_brad_pitt.yaml, 4 per GPU
    x_f, c_f = torch.randn(b, 4, 4, 4), torch.randn(b, 77, 16)
    x_r, c_r = torch.randn(b, 4, 4, 4), torch.randn(b, 77, 16)
    t_f, t_r = torch.randint(0, T, (b,)), torch.randint(0, T, (b,))
    e_f, e_r = torch.randn(b, 4, 4, 4), torch.randn(b, 4, 4, 4)
    data = _official_sd_loss(unet, x_f, c_f, t_f, e_f) + \
        gamma * _official_sd_loss(unet, x_r, c_r, t_r, e_r)
    official = _ratios(adapter, data, _official_penalty(dict(adapter.named_parameters()),
                                                        official_f, theta_star), lmbda)

    draws = iter([(t_f, e_f), (t_r, e_r)] * 2)
    kit_data, kit_pen = _kit_terms(adapter, (x_f, c_f), (x_r, c_r), kit_f, theta_star, lmbda,
                                   gamma, draws)
    return _ratios(adapter, kit_data, kit_pen, lmbda), official


def test_cvae_scale_matches_the_official_code():
    _close(*measure_cvae())


def test_ddpm_scale_matches_the_official_code():
    _close(*measure_ddpm())


def test_sd_scale_matches_the_official_code():
    _close(*measure_sd())
