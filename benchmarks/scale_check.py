"""Print, per model, the kit's penalty-to-data ratio beside the official code's (one process).

    .venv/bin/python benchmarks/scale_check.py

For the cVAE, the DDPM and Stable Diffusion (tiny models at a perturbed theta, the published
lambda and batch size), ``tests/test_scale.py`` re-implements the official code's data terms,
Fisher and penalty independently; this script prints what it measures:

    ratio = lambda * penalty / data terms,   grad ratio = ||grad(lambda * penalty)|| / ||grad(data)||

for the kit and the official formulas, and their relative difference (target <= 1e-4).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_scale import measure_cvae, measure_ddpm, measure_sd  # noqa: E402


def main() -> None:
    print(f"{'model':18s}{'lambda':>8s}{'kit ratio':>14s}{'official':>14s}{'rel diff':>10s}"
          f"{'kit grad':>12s}{'official':>12s}{'rel diff':>10s}{'s':>6s}")
    for name, lmbda, fn in (("cVAE (MNIST)", 100, measure_cvae), ("DDPM", 10, measure_ddpm),
                            ("Stable Diffusion", 50, measure_sd)):
        t0 = time.perf_counter()
        (kv, kg), (ov, og) = fn()
        print(f"{name:18s}{lmbda:8d}{kv:14.6g}{ov:14.6g}{abs(kv - ov) / ov:10.1e}"
              f"{kg:12.6g}{og:12.6g}{abs(kg - og) / og:10.1e}{time.perf_counter() - t0:6.0f}")


if __name__ == "__main__":
    main()
