"""``make warm``: build every cache a class needs before the class starts, and say what it cost.

A lab of thirty laptops (or one shared machine) should not train thirty copies of the same cVAE
in the first ten minutes. ``python -m sa_kit.warm`` runs, for the chosen profile
(``SA_KIT_PROFILE``, default ``cpu``), each chapter's own cached building blocks from
:mod:`sa_kit.chapters` -- the trained models, the evaluators, the Fishers -- so that a chapter
then loads them in seconds. It prints the time per step, the total, and the disk the cache
uses. Copy the cache folder (``SA_KIT_CACHE``) to the lab machines, or run it on each.

``STEPS`` maps a chapter to its step; a new chapter adds one function and one entry.

Example:
    >>> from sa_kit.warm import STEPS
    >>> list(STEPS)[:2]
    ['01 cVAE (MNIST)', '02 DDPM']
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from sa_kit.io import cache_root

__all__ = ["STEPS", "warm", "disk_usage", "main"]


def chapter1(profile: Any) -> list[str]:
    """The cVAE, the paper's evaluator, the outlier-aware evaluator, the Fisher."""
    from sa_kit.chapters import mnist_cvae as ch
    sizes, device = profile.mnist, profile.device
    train, _ = ch.mnist_splits(seed=0, verbose=False)
    vae = ch.pretrained_cvae(train, sizes, device)
    ch.pretrained_classifier(train, sizes, device)
    ch.outlier_aware_classifier(train, sizes, device)
    ch.cvae_fisher(vae, sizes)
    return ["cVAE", "evaluator", "outlier-aware evaluator", "Fisher"]


def chapter2(profile: Any) -> list[str]:
    """The DDPM, its evaluator, its diffusion Fisher."""
    from sa_kit.chapters import ddpm_digits as ch
    sizes, device = profile.ddpm, profile.device
    train, _ = ch.load_data(sizes, verbose=False).split(test_fraction=0.1, seed=0)
    ch.pretrained_classifier(train, sizes, device)
    ddpm = ch.pretrained_ddpm(train, sizes, device)
    ch.ddpm_fisher(ddpm, sizes)
    return ["evaluator", "DDPM", "diffusion Fisher"]


def chapter3(profile: Any) -> list[str]:
    """The coloured-digit text-to-image model, its evaluator, and the tool's data and Fisher.

    The data sets and the Fisher are made by the chapter's first forgetting run ("seven" ->
    "one"), which is cached with them; on a GPU the model is Stable Diffusion (downloaded or in
    the Hugging Face cache), and only the evaluator is built here.
    """
    from sa_kit.chapters import text_to_image as ch
    from sa_kit.sd.digits import T2ISizes
    sd = profile.sd
    ch.t2i_evaluator(sd.model_sizes or T2ISizes())
    if sd.model_sizes is None:
        return ["evaluator"]
    model_dir = ch.pretrained_t2i(sd.model_sizes)
    ch.forget_run(sd.run, model_dir, forget_prompt="seven", surrogate_prompt="one")
    return ["text-to-image model", "evaluator", "replay/surrogate data + Fisher + first run"]


def chapter4(profile: Any) -> list[str]:
    """What notebook 04 computes: the profile's methods and seeds (``ProbeSizes.seeds``,
    ``t2i_methods``), each made (retrained models, forgetting runs, edits) and probed.

    The rows of chapter 4's tables are cached, so the chapter then reads them in seconds; the
    headline tables (every method, more seeds) are ``benchmarks/probes.py``'s.
    """
    from sa_kit.chapters import is_it_forgotten as ch
    for family in ch.FAMILIES:
        ch.probe_family(family, profile, progress=True)
    return [f"probe tables: {', '.join(ch.FAMILIES)} (models retrained without c_f, forgetting "
            "runs, probe rows)"]


STEPS: dict[str, Callable[[Any], list[str]]] = {
    "01 cVAE (MNIST)": chapter1,
    "02 DDPM": chapter2,
    "03 text-to-image": chapter3,
    "04 is it forgotten?": chapter4,
}


def disk_usage(path: str | Path) -> int:
    """Bytes under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def warm(profile: Any, only: Sequence[str] | None = None,
         echo: Callable[[str], None] = print) -> dict[str, float]:
    """Run the steps (all, or those whose name starts with one of ``only``); seconds per step."""
    chosen = [name for name in STEPS if not only or any(name.startswith(o) for o in only)]
    if only and not chosen:
        raise ValueError(f"only must name chapters of {list(STEPS)}; got {list(only)}")
    seconds = {}
    for name in chosen:
        start = time.perf_counter()
        built = STEPS[name](profile)
        seconds[name] = time.perf_counter() - start
        echo(f"  {name:<22} {seconds[name]:7.1f} s  ({', '.join(built)})")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    from sa_kit.profiles import get_profile
    parser = argparse.ArgumentParser(prog="python -m sa_kit.warm", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("chapters", nargs="*", help="chapter numbers to warm (default: all)")
    args = parser.parse_args(argv)
    profile = get_profile(os.environ.setdefault("SA_KIT_PROFILE", "cpu"))
    root = cache_root()
    before = disk_usage(root)
    print(f"warming the cache for profile '{profile.name}' in {root}")
    start = time.perf_counter()
    try:
        warm(profile, [c.zfill(2) for c in args.chapters] or None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total, after = time.perf_counter() - start, disk_usage(root)
    print(f"warm in {total:.0f} s ({total / 60:.1f} min); the cache holds "
          f"{after / 2**20:.1f} MiB ({(after - before) / 2**20:+.1f} MiB now)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
