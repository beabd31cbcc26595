"""Per-sample vs fast exact Fisher on the MNIST cVAE, on the same model samples.

Prints samples/s of each estimator, their ratio and the largest relative difference.
Target: >= 100x faster, <= 1e-4 difference, on 2 CPU cores.

Run: ``python benchmarks/fisher_speed.py [--samples 2000]``
"""
from __future__ import annotations

import argparse
import time

import torch

from sa_kit.fisher import fisher_fast, fisher_per_sample
from sa_kit.models import ConditionalVAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000, help="fast estimator's batch")
    parser.add_argument("--reference-samples", type=int, default=300,
                        help="samples timed for the (slow) per-sample estimator")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = ConditionalVAE()           # the paper's 784-512-256, z=8 cVAE (trained or not:
    c = torch.arange(args.samples) % 10   # the cost and the algebra are the same)
    x = vae.sample(c)
    noise = vae.draw_noise(x)
    n_ref = min(args.reference_samples, args.samples)

    fisher_per_sample(vae, x[:8], c[:8], (noise[0][:8],))              # warm-up
    t0 = time.perf_counter()
    ref = fisher_per_sample(vae, x[:n_ref], c[:n_ref], (noise[0][:n_ref],))
    ref_rate = n_ref / (time.perf_counter() - t0)

    fisher_fast(vae, x[:8], c[:8], (noise[0][:8],))                    # warm-up
    t0 = time.perf_counter()
    sums = None
    for i in range(0, args.samples, args.batch):
        sl = slice(i, i + args.batch)
        part = fisher_fast(vae, x[sl], c[sl], (noise[0][sl],))
        n = len(c[sl])
        sums = {k: v * n for k, v in part.items()} if sums is None else \
            {k: sums[k] + v * n for k, v in part.items()}
    fast_rate = args.samples / (time.perf_counter() - t0)

    same = fisher_fast(vae, x[:n_ref], c[:n_ref], (noise[0][:n_ref],))
    rel = max(float((ref[k] - same[k]).abs().max() / ref[k].abs().max()) for k in ref)
    print(f"threads: {torch.get_num_threads()}  model: cVAE 784-512-256 z=8 "
          f"({sum(p.numel() for p in vae.parameters()):,} parameters)")
    print(f"{'estimator':<28}{'samples/s':>12}")
    print(f"{'per-sample (reference)':<28}{ref_rate:12.1f}")
    print(f"{'fast exact (batched)':<28}{fast_rate:12.1f}")
    print(f"speed-up: {fast_rate / ref_rate:.1f}x (target >= 100x)")
    print(f"max relative difference on the same {n_ref} samples: {rel:.2e} (target <= 1e-4)")


if __name__ == "__main__":
    main()
