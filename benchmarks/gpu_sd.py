"""GPU sizing for chapter 3: SA step time, peak memory and Fisher throughput on the SD v1.4 UNet.

Builds the Stable Diffusion v1.4 UNet from its published config with *random* weights (no
download needed; speed and memory do not depend on the weight values) and reports, at batch 4
in bf16 autocast:

* one SA training step (``sa_kit.objective.sa_loss``: surrogate + replay + EWC, backward, AdamW)
  for ``train_method`` = ``full``, ``xattn`` and ``noxattn``, with and without gradient
  checkpointing: seconds per step and peak GPU memory;
* the paper's diffusion Fisher (``sa_kit.diffusion_fisher``): seconds per replay item for K
  stratified timesteps, and the time the published Fisher (5000 items x all 1000 timesteps)
  would take on this GPU.

Usage:  python benchmarks/gpu_sd.py            (CUDA; about 3-6 minutes)
        python benchmarks/gpu_sd.py --tiny     (the tiny test UNet, any device: a smoke test)
Without CUDA and without ``--tiny`` it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

# The published config of CompVis/stable-diffusion-v1-4 (unet/config.json).
SD14_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    center_input_sample=False, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
    out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"))


def build(tiny: bool, device: str):
    """The adapter over a random UNet (SD v1.4 or tiny); c is given as hidden states."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sa_kit.sd.adapter import SDAdapter
    from sa_kit.sd.pipeline import TINY_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD14_UNET)).to(device)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    return SDAdapter(unet, nn.Module(), None, sched).to(device)


def batch(adapter, n: int, device: str):
    cfg = adapter.unet.config
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    c = torch.randn(n, 77, cfg.cross_attention_dim, device=device)
    return x, c


def sa_step_time(adapter, method: str, checkpointing: bool, bs: int, device: str,
                 steps: int) -> dict:
    """Seconds per SA step and peak memory for one train_method."""
    from sa_kit.objective import sa_loss
    from sa_kit.sd.adapter import select_parameters
    select_parameters(adapter.unet, method)
    if checkpointing:
        adapter.unet.enable_gradient_checkpointing()
    else:
        adapter.unet.disable_gradient_checkpointing()
    adapter.train()
    named = {k: p for k, p in adapter.named_parameters() if p.requires_grad}
    theta_star = {k: p.detach().clone() for k, p in named.items()}
    fisher = {k: torch.rand_like(p) * 1e-6 for k, p in named.items()}  # timing only
    opt = torch.optim.AdamW(named.values(), lr=1.6e-4)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):  # two warm-up steps
        surr, rep = batch(adapter, bs, device), batch(adapter, bs, device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            terms = sa_loss(adapter, surr, rep, fisher, theta_star, lmbda=50.0, gamma=1.0)
        terms["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del opt, fisher, theta_star
    return {"train_method": method, "grad_checkpointing": checkpointing, "batch": bs,
            "trainable_params": sum(p.numel() for p in named.values()),
            "s_per_step": sum(times) / len(times), "peak_gib": peak}


def fisher_rate(adapter, k: int, n: int, device: str) -> dict:
    """Seconds per item of the diffusion Fisher with K stratified timesteps, full UNet."""
    from sa_kit.diffusion_fisher import diffusion_fisher
    from sa_kit.sd.adapter import select_parameters
    select_parameters(adapter.unet, "full")
    adapter.unet.disable_gradient_checkpointing()
    x, c = batch(adapter, n, device)
    cuda = device == "cuda"
    try:
        for rep in range(2):  # warm-up, then timed
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                f = diffusion_fisher(adapter, x, c, k, chunk_size=min(k, 8), progress=False)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            del f
    except (RuntimeError, torch.OutOfMemoryError) as e:
        return {"fisher_timesteps": k, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    per_item = dt / n
    return {"fisher_timesteps": k, "items": n, "s_per_item": per_item, "peak_gib": peak,
            "published_fisher_hours": 5000 * per_item * 1000 / k / 3600}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test UNet (smoke test)")
    ap.add_argument("--steps", type=int, default=10, help="timed SA steps per setting")
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    if not torch.cuda.is_available() and not a.tiny:
        print("gpu_sd.py: no CUDA device found; nothing measured (use --tiny for a CPU smoke "
              "test of the script).")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print("device:", torch.cuda.get_device_name(), flush=True)
    adapter = build(a.tiny, device)
    n = sum(p.numel() for p in adapter.unet.parameters())
    print(json.dumps({"unet": "tiny" if a.tiny else "sd-v1.4 (random weights)",
                      "params": n}), flush=True)
    t_start = time.perf_counter()
    for method in ("full", "xattn", "noxattn"):
        for ckpt in (False, True):
            print(json.dumps(sa_step_time(adapter, method, ckpt, a.batch, device, a.steps)),
                  flush=True)
    print(json.dumps(fisher_rate(adapter, 20, 2, device)), flush=True)
    print(json.dumps({"total_s": time.perf_counter() - t_start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
