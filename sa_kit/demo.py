"""``make demo``: forget digit 0 of an MNIST conditional VAE, offline, and print the result.

Trains (or loads from the cache) the cVAE and its evaluation classifier, computes the Fisher,
runs Selective Amnesia with digit 0 -> uniform noise, and prints a before/after table with the
seconds each stage took, beside the published reference and the kit's targets.

Run: ``python -m sa_kit.demo`` (``SA_KIT_PROFILE`` picks the sizes; default cpu/gpu).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Callable

from sa_kit import seed_everything
from sa_kit.forget import forget_class
from sa_kit.metrics import accuracy, evaluate_forgetting
from sa_kit.mnist import cvae_fisher, mnist_splits, pretrained_classifier, pretrained_cvae
from sa_kit.profiles import get_profile

PUBLISHED = {"H": 2.19, "P_cf": 0.058}


def _timed(label: str, times: dict[str, float], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    times[label] = time.perf_counter() - start
    return out


def check_targets(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, bool]]:
    """The demo's targets (issue 2): H >= 2.19, P(c_f) <= 0.10, remembered acc >= 0.95x."""
    return [("H >= 2.19", after["H"] >= 2.19),
            ("P(c_f) <= 0.10", after["P_cf"] <= 0.10),
            ("remembered accuracy >= 0.95 x original",
             after["acc_remembered"] >= 0.95 * before["acc_remembered"])]


def format_table(before: dict[str, Any], after: dict[str, Any], times: dict[str, float]) -> str:
    """The before/after table and the stage timings as text."""
    rows = [f"{'':28s}{'H (max 2.303)':>15s}{'P(c_f)':>10s}{'acc remembered':>16s}",
            f"{'original model':28s}{before['H']:15.3f}{before['P_cf']:10.3f}"
            f"{before['acc_remembered']:16.3f}",
            f"{'after SA (0 -> noise)':28s}{after['H']:15.3f}{after['P_cf']:10.3f}"
            f"{after['acc_remembered']:16.3f}",
            f"{'published (Heng & Soh 2023)':28s}{PUBLISHED['H']:15.3f}{PUBLISHED['P_cf']:10.3f}"
            f"{'-':>16s}", "", "seconds per stage:"]
    rows += [f"  {k:28s}{v:8.1f}" for k, v in times.items()]
    rows.append(f"  {'total':28s}{sum(times.values()):8.1f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default=None, help="ci | cpu | gpu (default: SA_KIT_PROFILE)")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    sizes, dev, c_f = profile.mnist, profile.device, args.forget_class
    print(f"sa-kit demo -- profile {profile.name!r} on {dev}; forgetting digit {c_f} -> noise")
    times: dict[str, float] = {}
    train, test = _timed("data", times, lambda: mnist_splits(args.seed))
    vae = _timed("cVAE (train or load)", times,
                 lambda: pretrained_cvae(train, sizes, dev, args.seed))
    clf = _timed("classifier (train or load)", times,
                 lambda: pretrained_classifier(train, sizes, dev, args.seed))
    print(f"classifier accuracy on real test digits: {accuracy(clf, test.x, test.y):.3f}")
    fisher = _timed("Fisher (fast, exact)", times, lambda: cvae_fisher(vae, sizes, args.seed))
    seed_everything(args.seed)
    before = _timed("evaluation before", times,
                    lambda: evaluate_forgetting(vae, clf, c_f, sizes.eval_samples))
    _timed(f"forgetting ({sizes.forget_steps} steps)", times, lambda: forget_class(
        vae, c_f, fisher=fisher, mapping="noise", lmbda=sizes.lmbda, gamma=sizes.gamma,
        steps=sizes.forget_steps, batch_size=sizes.batch_size, lr=sizes.lr))
    seed_everything(args.seed)
    after = _timed("evaluation after", times,
                   lambda: evaluate_forgetting(vae, clf, c_f, sizes.eval_samples))
    print()
    print(format_table(before, after, times))
    results = check_targets(before, after)
    print("\ntargets:")
    for name, ok in results:
        print(f"  [{'ok' if ok else 'MISSED'}] {name}")
    return 0 if all(ok for _, ok in results) or profile.name == "ci" else 1


if __name__ == "__main__":
    sys.exit(main())
