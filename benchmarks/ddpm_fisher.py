"""The diffusion Fisher: all T timesteps (the official computation) vs K stratified timesteps.

    .venv/bin/python benchmarks/ddpm_fisher.py [--samples 4] [--k 10 50 200] [--repeats 5]

One process, the chapter-2 CPU UNet (16x16 RGB, channels 32/32/64), the model's own samples.
The exact Fisher (``num_timesteps=None``) sums each sample's loss over all 1000 timesteps before
squaring its gradient; the fast one estimates that sum from K stratified timesteps, either
squaring one estimate (``square``, biased upward: E[g^2] = g^2 + Var g) or multiplying two
independent half-size estimates (``product``, unbiased). All see the same noise table, so the
comparison is exact up to the choice of timesteps. Printed per K and estimator: seconds and
speed-up over the exact Fisher; relative error ||F - F_exact|| / ||F_exact|| and Spearman rank
correlation of one estimate; and the bias of the total Fisher mass averaged over ``repeats``
seeds, (E sum F - sum F_exact) / sum F_exact.
"""
from __future__ import annotations

import argparse
import time

import torch

from sa_kit import seed_everything
from sa_kit.diffusion_fisher import diffusion_fisher, fisher_agreement
from sa_kit.models.ddpm import ClassConditionalDDPM, build_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4, help="generated samples N")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 50, 200], help="timesteps K")
    ap.add_argument("--repeats", type=int, default=5, help="seeds for the bias estimate")
    args = ap.parse_args()
    seed_everything(0)
    unet = build_unet(10, 16, 3, (32, 32, 64), norm_num_groups=8)
    model = ClassConditionalDDPM(unet, 10, num_inference_steps=5)
    T = model.num_train_timesteps
    c = torch.arange(args.samples) % 10
    x = model.sample(c)
    eps = torch.randn(args.samples, T, *x.shape[1:])
    print(f"threads: {torch.get_num_threads()}  UNet parameters: "
          f"{sum(p.numel() for p in model.unet.parameters()):,}  samples: {args.samples}")
    t0 = time.perf_counter()
    exact = diffusion_fisher(model, x, c, None, eps=eps, chunk_size=250, progress=False)
    t_exact = time.perf_counter() - t0
    mass = sum(float(v.sum()) for v in exact.values())
    print(f"exact (all {T} timesteps): {t_exact:.1f} s\n")
    print(f"{'K':>5s} {'estimator':>9s} {'seconds':>8s} {'speed-up':>9s} {'rel error':>10s} "
          f"{'Spearman':>9s} {'top10%':>7s} {'mass bias':>10s}")
    for k in args.k:
        for est in ("square", "product"):
            t0 = time.perf_counter()
            fast = diffusion_fisher(model, x, c, k, estimator=est, eps=eps, seed=0,
                                    chunk_size=min(k, 250), progress=False)
            secs = time.perf_counter() - t0
            agree = fisher_agreement(fast, exact)
            biases = [agree["bias"]] + [
                sum(float(v.sum()) for v in diffusion_fisher(
                    model, x, c, k, estimator=est, eps=eps, seed=s, chunk_size=min(k, 250),
                    progress=False).values()) / mass - 1 for s in range(1, args.repeats)]
            print(f"{k:5d} {est:>9s} {secs:8.1f} {t_exact / secs:8.1f}x {agree['rel_error']:10.3f} "
                  f"{agree['spearman']:9.3f} {agree['top10_overlap']:7.2f} "
                  f"{sum(biases) / len(biases):+10.3f}")


if __name__ == "__main__":
    main()
