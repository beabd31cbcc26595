"""Exact vs fast diffusion Fisher on a small UNet: speed ratio and agreement.

The exact estimator (the original code's) takes each sample's loss over all T = 1000
timesteps; the fast one a stratified subsample of K timesteps (sa_kit/diffusion_fisher.py).
Both see the same samples and the same noise table. Run:

    .venv/bin/python benchmarks/ddpm_fisher.py [--samples 4] [--k 25 50 100]
"""
from __future__ import annotations

import argparse
import time

import torch

from sa_kit import seed_everything
from sa_kit.diffusion_fisher import diffusion_fisher_exact, diffusion_fisher_fast, fisher_agreement
from sa_kit.models.ddpm import ClassConditionalDDPM, build_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4, help="generated samples N")
    ap.add_argument("--k", type=int, nargs="+", default=[25, 50, 100], help="timesteps K")
    ap.add_argument("--size", type=int, default=16, help="image side")
    args = ap.parse_args()
    seed_everything(0)
    unet = build_unet(10, args.size, 3, (16, 32), norm_num_groups=8)
    model = ClassConditionalDDPM(unet, 10, num_inference_steps=5)
    n_params = sum(p.numel() for p in model.parameters())
    c = torch.arange(args.samples) % 10
    x = model.sample(c)
    eps = torch.randn(args.samples, 1000, *x.shape[1:])
    print(f"UNet {n_params:,} parameters, {args.size}x{args.size} RGB, N = {args.samples} "
          f"samples, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    exact = diffusion_fisher_exact(model, x, c, eps, chunk_size=250, progress=False)
    t_exact = time.perf_counter() - t0
    print(f"{'estimator':<22}{'seconds':>9}{'speed-up':>10}{'rel.err':>9}{'spearman':>10}"
          f"{'top10%':>8}")
    print(f"{'exact (T = 1000)':<22}{t_exact:9.2f}{1.0:10.1f}{0:9.3f}{1:10.3f}{1:8.2f}")
    for k in args.k:
        t0 = time.perf_counter()
        fast = diffusion_fisher_fast(model, x, c, k, eps=eps, chunk_size=k, progress=False,
                                     generator=torch.Generator().manual_seed(k))
        t_fast = time.perf_counter() - t0
        a = fisher_agreement(fast, exact)
        print(f"{f'fast (K = {k})':<22}{t_fast:9.2f}{t_exact / t_fast:10.1f}"
              f"{a['rel_error']:9.3f}{a['spearman']:10.3f}{a['top10_overlap']:8.2f}")


if __name__ == "__main__":
    main()
