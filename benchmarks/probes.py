"""Chapter 4's headline tables: method x probe, mean ± std over seeds, one table per model.

    SA_KIT_PROFILE=cpu python benchmarks/probes.py            # cVAE, DDPM, text-to-image
    SA_KIT_PROFILE=ci  python benchmarks/probes.py cvae       # one family, the small profile

This runs the profile's headline set (``ProbeSizes.headline_seeds``, every method of
``headline_t2i_methods``), more than notebook 04 computes on a CPU; the notebook shows these
tables too once this script has run. Every row is cached (the notebook 04 run and this script
share the rows): a second run prints the same numbers in seconds.

Columns: P(c_f) (the plain test); inversion (share of samples the evaluator calls c_f with p >=
0.5 after a condition / embedding inversion); relearn k=K (steps of fine-tuning on K real images
of c_f until P(c_f) >= 0.5; "never" within the budget, with how many seeds recovered in
brackets); NLL (negative ELBO of real held-out images: nats for the cVAE, the epsilon-loss for
the diffusion models); method seconds (text-to-image: the wall-clock time of the forgetting run
or edit, as the run recorded it).
"""
from __future__ import annotations

import argparse
import time

from sa_kit.chapters import is_it_forgotten as C
from sa_kit.profiles import get_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help=f"some of {', '.join(C.FAMILIES)} (default: all)")
    args = ap.parse_args()
    families = args.families or list(C.FAMILIES)
    unknown = [f for f in families if f not in C.FAMILIES]
    if unknown:
        ap.error(f"unknown family {unknown[0]!r}: choose from {', '.join(C.FAMILIES)}")
    profile = get_profile()
    ps = profile.probes
    print(f"profile {profile.name}; seeds {ps.headline_seeds}; budgets: {ps}")
    for family in families:
        start = time.perf_counter()
        rows = C.probe_family(family, profile, progress=True, headline=True)
        table = C.summarise(rows, C.columns(family, ps))
        print(f"\n== {family}: c_f = {C.FORGET[family]} "
              f"({time.perf_counter() - start:.0f} s, cached rows reused) ==")
        print(C.format_table(table, len(next(iter(rows.values())))))


if __name__ == "__main__":
    main()
