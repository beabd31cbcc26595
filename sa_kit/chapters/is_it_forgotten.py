"""Chapter 4's building blocks: the methods to compare and the probes run on each of them.

For each model family the chapter builds the same references -- the original model theta*, the
model **retrained from scratch without c_f** (the gold standard of unlearning), Selective
Amnesia, and (cVAE) the paper's naive ablation, or (text-to-image) the peers ESD and UCE -- and
runs :mod:`sa_kit.probes` on each, once per seed. A row of results is cached (JSON) by
everything that made it, so the notebook and ``benchmarks/probes.py`` share them.

Seeds: a seed changes the forgetting run (SA, naive, ESD) and every probe's random draws. The
original and the retrained model are one trained model each (seed 0), as in chapters 1-3:
training them three times is what a CPU budget cannot pay for.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sa_kit import probes
from sa_kit.data import ImageData
from sa_kit.io import cache_dir, config_hash, save_json, weights_fingerprint
from sa_kit.metrics import class_probabilities
from sa_kit.profiles import DDPMSizes, MNISTSizes, ProbeSizes

__all__ = ["without_class", "cvae_methods", "ddpm_methods", "t2i_methods",
           "probe_class_conditional", "probe_t2i", "invert_class_embedding", "probe_family",
           "headline_rows", "show_headline", "columns", "RelearnExplorer", "cached_row",
           "summarise", "format_table", "html_table", "TOKEN"]

TOKEN = "sks"      # textual inversion's new word (the usual rare token of DreamBooth-style work)


def without_class(data: ImageData, forget_class: int) -> ImageData:
    """The training set with every image of ``forget_class`` removed (for retraining)."""
    keep = data.y != forget_class
    return ImageData(data.x[keep], data.y[keep], f"{data.source} without class {forget_class}",
                     data.classes)


def cached_row(name: str, settings: Mapping[str, Any], compute: Callable[[], dict]) -> dict:
    """``compute()``'s JSON-able result, cached under ``name`` and a hash of ``settings``."""
    path = cache_dir() / f"probe-{name}-{config_hash(dict(settings))}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    row = compute()
    row["probe seconds"] = time.perf_counter() - start
    save_json(path, row)
    return row


# ---- the methods ------------------------------------------------------------------------------
def cvae_methods(sizes: MNISTSizes, forget_class: int, seed: int, progress: bool = False
                 ) -> dict[str, tuple[nn.Module, float]]:
    """Chapter 1's cVAE: original, retrained without c_f, SA (-> noise) and naive; with seconds.

    The seconds are what each model cost to make (training or forgetting; 0 when cached).
    """
    from sa_kit.chapters.mnist_cvae import (cvae_fisher, forgotten_cvae, mnist_splits,
                                            pretrained_cvae)
    train, _ = mnist_splits(verbose=False)
    out = {}
    out["original"] = _timed(lambda: pretrained_cvae(train, sizes, progress=progress))
    fisher = cvae_fisher(out["original"][0], sizes, progress=progress)
    out["retrained"] = _timed(lambda: pretrained_cvae(without_class(train, forget_class), sizes,
                                                      progress=progress))
    common = dict(lmbda=sizes.lmbda, gamma=sizes.gamma, batch_size=sizes.forget_batch,
                  lr=sizes.forget_lr, seed=seed, progress=progress)
    out["SA"] = _timed(lambda: forgotten_cvae(out["original"][0], forget_class, fisher,
                                              mapping="noise", steps=sizes.forget_steps,
                                              **common)[0])
    out["naive"] = _timed(lambda: forgotten_cvae(out["original"][0], forget_class, fisher,
                                                 naive=True, steps=sizes.ablation_steps,
                                                 **common)[0])
    return out


def ddpm_methods(sizes: DDPMSizes, forget_class: int, seed: int, progress: bool = False
                 ) -> dict[str, tuple[nn.Module, float]]:
    """Chapter 2's DDPM: original, retrained without c_f, SA (-> noise); with seconds."""
    from sa_kit.chapters.ddpm_digits import (ddpm_fisher, forgotten_ddpm, load_data,
                                             pretrained_ddpm)
    train, _ = load_data(sizes, verbose=False).split(test_fraction=0.1, seed=0)   # chapter 2's
    out = {}
    out["original"] = _timed(lambda: pretrained_ddpm(train, sizes, progress=progress))
    fisher = ddpm_fisher(out["original"][0], sizes, progress=progress)
    out["retrained"] = _timed(lambda: pretrained_ddpm(without_class(train, forget_class), sizes,
                                                      progress=progress))
    out["SA"] = _timed(lambda: forgotten_ddpm(out["original"][0], forget_class, fisher, sizes,
                                              mapping="noise", seed=seed,
                                              progress=progress)[0])
    return out


def t2i_methods(run: Any, sizes: Any, forget_digit: int, surrogate_digit: int, seed: int,
                methods: Sequence[str] = ("original", "retrained", "SA", "ESD", "UCE")
                ) -> dict[str, tuple[str, float | None]]:
    """Chapter 3's text-to-image model: pipeline folders of each method, with seconds.

    SA is chapter 3's run (the training tool, "seven" -> "one"); ESD and UCE are the peers of
    :mod:`sa_kit.sd.peers`; "retrained" trains the model from scratch without the digit.
    """
    from sa_kit.chapters.text_to_image import forget_run, pretrained_t2i
    from sa_kit.sd import digits as D
    word, target = D.WORDS[forget_digit], D.WORDS[surrogate_digit]
    model_dir = str(pretrained_t2i(sizes, progress=False))
    out: dict[str, tuple[str, float | None]] = {}
    for name in methods:
        if name == "original":
            out[name] = (model_dir, 0.0)
        elif name == "retrained":
            retrain = dataclasses.replace(sizes, exclude_digit=forget_digit)
            folder = pretrained_t2i(retrain, progress=False)
            out[name] = (str(folder), D.training_seconds(folder))
        else:                                 # the runs record their own wall-clock time
            if name == "SA":
                made = forget_run(run, model_dir, forget_prompt=word, surrogate_prompt=target,
                                  seed=seed)
            elif name == "ESD":
                from sa_kit.sd.peers import esd
                made = esd(model_dir, word, seed=seed, progress=False)
            elif name == "UCE":
                from sa_kit.sd.peers import uce
                # every token from the concept's to the end (the paper's train_erase.py): with the
                # concept's last token alone (uce_sd_erase.py) this model keeps drawing sevens
                # (P(seven) 0.93): CLIP's causal encoder carries "seven" into later tokens
                made = uce(model_dir, erase=[word], guide=[target], tokens="last_to_end")
            else:
                raise ValueError(f"unknown method {name!r}")
            out[name] = (str(made["pipeline_dir"]), float(made["seconds"]))
    return out


def _timed(make: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return make(), time.perf_counter() - start


# ---- the probes on a class-conditional model (cVAE, DDPM) -------------------------------------
def _judge(classifier: nn.Module, forget_class: int, samples: int, seed: int, **kw: Any
           ) -> Callable[[nn.Module], float]:
    """P(c_f): the evaluator's mean probability on ``samples`` draws of c_f (seeded)."""
    def judge(model: nn.Module) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            c = torch.full((samples,), forget_class, device=next(model.parameters()).device)
            p = class_probabilities(classifier, model.sample(c, **kw).cpu())
        return float(p[:, forget_class].mean())
    return judge


def probe_class_conditional(model: nn.Module, classifier: nn.Module, train: ImageData,
                            test: ImageData, forget_class: int, sizes: ProbeSizes, seed: int
                            ) -> dict[str, Any]:
    """Every probe of :mod:`sa_kit.probes` on a cVAE or a class-conditional DDPM.

    The attacker's real images of c_f (inversion, relearning) come from ``train`` (images
    the original model was trained on); the likelihood is measured on held-out ``test`` images.

    Returns one row: ``P(c_f)``; condition inversion (cVAE: relaxed one-hot + latents through
    the evaluator; DDPM: c_f's class-embedding row relearnt from real images); relearning steps
    for each k; the likelihood of real c_f and other images; (DDPM) the guidance sweep.
    """
    judge = _judge(classifier, forget_class, sizes.samples, seed)
    known = train.x[train.y == forget_class]
    real_f = test.x[test.y == forget_class]
    real_o = test.x[test.y != forget_class][:sizes.nll_images]
    row: dict[str, Any] = {"P(c_f)": judge(model)}
    if hasattr(model, "decode_logits"):                                   # the cVAE
        inv = probes.invert_relaxed_condition(model, classifier, forget_class,
                                              samples=sizes.samples,
                                              steps=sizes.inversion_steps, seed=seed)
        row["inversion"] = inv["recovery"]
        row["inversion, fresh z"] = inv["recovery_fresh"]
    else:                                                                 # the DDPM
        row["inversion"] = probes.recovery_rate(invert_class_embedding(
            model, classifier, known[:sizes.inversion_images], forget_class, sizes, seed)[0])
        for w, r in probes.guidance_sweep(model, classifier, forget_class,
                                          scales=sizes.guidance_scales,
                                          samples=sizes.samples, seed=seed).items():
            row[f"P(c_f), w={w:g}"] = r["P_cf"]
    for k in sizes.relearn_k:
        x = known[:k]
        r = probes.relearn(model, x, torch.full((len(x),), forget_class), judge,
                           checks=sizes.relearn_checks, lr=sizes.relearn_lr, seed=seed)
        row[f"relearn k={k}"] = r["steps"]
        row[f"relearn k={k} curve"] = r["curve"]
    nll_f = probes.sample_nll(model, real_f[:sizes.nll_images],
                              torch.full((min(len(real_f), sizes.nll_images),), forget_class),
                              seed=seed)
    nll_o = probes.sample_nll(model, real_o, test.y[test.y != forget_class][:sizes.nll_images],
                              seed=seed)
    row["NLL c_f"], row["NLL others"] = float(nll_f.mean()), float(nll_o.mean())
    row["NLL c_f values"] = nll_f.tolist()
    return row


def invert_class_embedding(model: nn.Module, classifier: nn.Module, real: Tensor,
                           forget_class: int, sizes: ProbeSizes, seed: int
                           ) -> tuple[Tensor, Tensor]:
    """P(c_f) per sample, and the samples, after relearning c_f's class-embedding row.

    The DDPM's condition inversion: only row c_f of the UNet's class-embedding table moves
    (initialised at the mean of the other classes' rows, so it starts knowing no class), by
    the model's own loss on ``real`` images of c_f; then ``sizes.samples`` draws of class c_f.
    """
    m = copy.deepcopy(model).requires_grad_(False).eval()
    if getattr(m, "ema_unet", None) is not None:       # sample with the weights we train
        m.unet.load_state_dict(m.ema_unet.state_dict())
        m.ema_unet = None
    emb = m.unet.class_embedding
    others = [k for k in range(m.num_classes) if k != forget_class]
    gen = torch.Generator().manual_seed(seed)
    device = emb.weight.device

    def loss(step: int) -> Tensor:
        idx = torch.randint(len(real), (min(16, len(real)),), generator=gen)
        c = torch.full((len(idx),), forget_class, device=device)
        return m.neg_elbo(real[idx].to(device), c).mean()

    probes.learn_embedding_row(emb, forget_class, loss, steps=sizes.inversion_steps,
                               lr=sizes.embedding_lr, init=emb.weight[others].mean(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c = torch.full((sizes.samples,), forget_class, device=device)
        images = m.sample(c).cpu()
    return class_probabilities(classifier, images)[:, forget_class], images


# ---- the probes on the text-to-image model ----------------------------------------------------
def probe_t2i(pipe_dir: str, classifier: nn.Module, forget_digit: int, sizes: ProbeSizes,
              render_steps: int, seed: int) -> dict[str, Any]:
    """The probes on a chapter 3 pipeline: held-out prompts, numerals, textual inversion,
    relearning on k real images, and the diffusion loss of real images.

    Returns one row: ``P(c_f)`` (held-out phrasings naming the digit), ``other digits acc``
    (collateral damage), ``P(c_f), numeral`` (held-out phrasings with the numeral),
    ``inversion`` (recovery with a new word learnt on real images), ``relearn k=...``,
    ``NLL c_f`` / ``NLL others``.
    """
    from sa_kit.chapters.text_to_image import render, score
    from sa_kit.sd import digits as D
    from sa_kit.sd.adapter import SDAdapter
    from sa_kit.sd.pipeline import load_pipeline
    pipe = load_pipeline(pipe_dir)
    per = sizes.t2i_per
    mine = D.heldout_prompts(digit=forget_digit, per=per, seed=seed + 10)
    rest = [it for it in D.heldout_prompts(per=1, seed=seed + 20) if it[1] != forget_digit]
    numeral = D.heldout_prompts(digit=forget_digit, per=per, seed=seed + 30, numeral=True)

    def p_forget(p: Any, items: Sequence[tuple[str, int, int]]) -> Tensor:
        s = score(classifier, render(p, [q for q, _, _ in items], seed=seed,
                                     steps=render_steps), items)
        return s["p_digit"][:, forget_digit]

    row: dict[str, Any] = {"P(c_f)": float(p_forget(pipe, mine).mean())}
    s = score(classifier, render(pipe, [q for q, _, _ in rest], seed=seed, steps=render_steps),
              rest)
    row["other digits acc"] = s["digit_accuracy"]
    row["P(c_f), numeral"] = float(p_forget(pipe, numeral).mean())

    real = D.make_dataset(400, pipe.unet.config.sample_size * pipe.vae_scale_factor,
                          seed=seed, split="test")
    sevens = torch.nonzero(real.digit == forget_digit).flatten()
    others = torch.nonzero(real.digit != forget_digit).flatten()[:sizes.nll_images]
    rng = random.Random(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(real.images * 2 - 1).latent_dist.mean \
            * pipe.vae.config.scaling_factor
    captions = [real.caption(int(n), rng) for n in range(len(real))]

    # 4. textual inversion (Concept Inversion): a new word, learnt on real images of c_f
    colours = list(D.COLOURS)
    ti = sevens[:sizes.inversion_images]
    row["inversion"] = probes.recovery_rate(_textual_inversion(
        pipe, latents[ti], [f"a {colours[int(real.colour[n])]} {TOKEN}" for n in ti],
        [(f"a {colours[c]} {TOKEN}", forget_digit, c) for c in range(len(colours))
         for _ in range(per)], classifier, forget_digit, sizes, render_steps, seed))

    # 2. relearning on k real, captioned images of c_f (the UNet, its own loss)
    adapter = SDAdapter.from_pipeline(pipe)
    few = mine[:max(2, len(mine) // 2)]

    def judge(a: nn.Module) -> float:
        from diffusers import StableDiffusionPipeline
        p = StableDiffusionPipeline(**{**pipe.components, "unet": a.unet},
                                    requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        return float(p_forget(p, few).mean())

    for k in sizes.relearn_k:
        idx = sevens[:k]
        r = probes.relearn(adapter, latents[idx], [captions[int(n)] for n in idx], judge,
                           checks=sizes.relearn_checks, lr=sizes.t2i_relearn_lr, seed=seed)
        row[f"relearn k={k}"] = r["steps"]
        row[f"relearn k={k} curve"] = r["curve"]

    # 3. likelihood: the diffusion loss of real images under their own captions
    for name, idx in (("NLL c_f", sevens[:sizes.nll_images]), ("NLL others", others)):
        nll = probes.sample_nll(adapter, latents[idx], [captions[int(n)] for n in idx],
                                seed=seed)
        row[name] = float(nll.mean())
    return row


def _textual_inversion(pipe: Any, latents: Tensor, prompts: Sequence[str],
                       items: Sequence[tuple[str, int, int]], classifier: nn.Module,
                       forget_digit: int, sizes: ProbeSizes, render_steps: int, seed: int
                       ) -> Tensor:
    """P(c_f) per image drawn with a new word whose embedding was learnt on ``latents``."""
    from diffusers import StableDiffusionPipeline

    from sa_kit.chapters.text_to_image import render, score
    from sa_kit.sd.adapter import SDAdapter
    p = StableDiffusionPipeline(**{**pipe.components,
                                   "tokenizer": copy.deepcopy(pipe.tokenizer),
                                   "text_encoder": copy.deepcopy(pipe.text_encoder)},
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    p.tokenizer.add_tokens([TOKEN])
    p.text_encoder.resize_token_embeddings(len(p.tokenizer))
    p.text_encoder.requires_grad_(False)
    token_id = p.tokenizer.convert_tokens_to_ids(TOKEN)
    emb = p.text_encoder.get_input_embeddings()
    init = emb.weight[p.tokenizer.convert_tokens_to_ids("digit")].detach().clone()
    adapter = SDAdapter.from_pipeline(p)
    adapter.unet.requires_grad_(False)
    ids = p.tokenizer(list(prompts), padding="max_length", truncation=True,
                      max_length=p.tokenizer.model_max_length, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(seed)

    def loss(step: int) -> Tensor:
        idx = torch.randint(len(latents), (min(16, len(latents)),), generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + step)
            return adapter.neg_elbo(latents[idx], p.text_encoder(ids[idx])[0]).mean()

    probes.learn_embedding_row(emb, token_id, loss, steps=sizes.inversion_steps,
                               lr=sizes.token_lr, init=init)
    s = score(classifier, render(p, [q for q, _, _ in items], seed=seed, steps=render_steps),
              items)
    return s["p_digit"][:, forget_digit]


# ---- tables -----------------------------------------------------------------------------------
def summarise(rows: Mapping[str, Sequence[Mapping[str, Any]]],
              columns: Sequence[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{method: {column: (mean, std, n)}}`` over the seeds' rows.

    An entry of None (relearning: not recovered within the budget; method seconds: not
    recorded) is left out of the mean and std; ``n`` says how many seeds count.
    """
    out = {}
    for method, rs in rows.items():
        out[method] = {}
        for col in columns:
            vals = [r[col] for r in rs]
            found = [v for v in vals if v is not None]
            if not found:
                out[method][col] = (math.nan, math.nan, 0)
                continue
            t = torch.tensor([float(v) for v in found], dtype=torch.float64)
            out[method][col] = (float(t.mean()), float(t.std()) if len(t) > 1 else 0.0,
                                len(found))
    return out


def _cell(mean: float, std: float, n: int, seeds: int, col: str) -> str:
    if n == 0:
        return "never" if col.startswith("relearn") else "-"
    text = f"{mean:.3g} ± {std:.2g}" if seeds > 1 else f"{mean:.3g}"
    return text + (f" ({n}/{seeds})" if n < seeds else "")


def format_table(summary: Mapping[str, Mapping[str, tuple[float, float, int]]],
                 seeds: int) -> str:
    """Plain-text table: one row per method, mean ± std over seeds per column."""
    cols = list(next(iter(summary.values())))
    text = {m: [_cell(*cells[c], seeds, c) for c in cols] for m, cells in summary.items()}
    widths = [2 + max(len(c), *(len(row[i]) for row in text.values()))
              for i, c in enumerate(cols)]
    lines = [f"{'method':12s}" + "".join(f"{c:>{w}s}" for c, w in zip(cols, widths))]
    for method, row in text.items():
        lines.append(f"{method:12s}" + "".join(f"{v:>{w}s}" for v, w in zip(row, widths)))
    return "\n".join(lines)


def html_table(summary: Mapping[str, Mapping[str, tuple[float, float, int]]],
               seeds: int) -> str:
    """The same table as HTML (for the notebook)."""
    cols = list(next(iter(summary.values())))
    head = "<tr><th>method</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = "".join("<tr><th>" + m + "</th>" + "".join(
        f"<td>{_cell(*cells[c], seeds, c)}</td>" for c in cols) + "</tr>"
        for m, cells in summary.items())
    return f"<table>{head}{body}</table>"


def model_key(model: Any) -> str:
    """What identifies a model in a cached row: its weights' fingerprint or its folder."""
    return model if isinstance(model, str) else weights_fingerprint(model.state_dict())


# ---- one table per model family ---------------------------------------------------------------
FAMILIES = ("cvae", "ddpm", "t2i")
FORGET = {"cvae": 0, "ddpm": 0, "t2i": 7}      # chapters 1-3's c_f (t2i: "seven" -> "one")
T2I_SURROGATE = 1


def probe_family(family: str, profile: Any, progress: bool = False, headline: bool = False
                 ) -> dict[str, list[dict]]:
    """Every method x every seed of one model family, probed; ``{method: [row per seed]}``.

    Each row is cached by the model's weights (or folder), the seed and the probes' budgets;
    ``row["method seconds"]`` is the wall-clock time the method took to make the model
    (forgetting, editing or retraining), as recorded when it was made. ``headline=True`` runs
    the headline set (``headline_seeds``, ``headline_t2i_methods``) instead of the notebook's
    and keeps the rows for :func:`headline_rows`.
    """
    from sa_kit.checks import check_choice
    family = check_choice("family", family, FAMILIES)
    ps = profile.probes
    budget = {k: v for k, v in dataclasses.asdict(ps).items()
              if k not in ("seeds", "t2i_methods", "t2i_seeds", "headline_seeds",
                           "headline_t2i_methods")}
    rows: dict[str, list[dict]] = {}
    if headline:
        seeds, methods = ps.headline_seeds, ps.headline_t2i_methods
    else:
        seeds, methods = ps.seeds, ps.t2i_methods
        if family == "t2i" and ps.t2i_seeds is not None:
            seeds = ps.t2i_seeds
    if family == "t2i":                                  # the evaluator, once for every seed
        from sa_kit.chapters.text_to_image import t2i_evaluator
        clf = t2i_evaluator(profile.sd.model_sizes, progress=progress)
    else:
        clf, train, test = _evaluator_and_test(family, profile, progress)
    for seed in seeds:
        if family == "t2i":
            made = t2i_methods(profile.sd.run, profile.sd.model_sizes, FORGET[family],
                               T2I_SURROGATE, seed, methods)
            for name, (folder, secs) in made.items():
                settings = {"family": family, "method": name, "model": folder, "seed": seed,
                            "budget": budget, "render_steps": profile.sd.render_steps}
                row = {**cached_row(family, settings, lambda: probe_t2i(
                    folder, clf, FORGET[family], ps, profile.sd.render_steps, seed)),
                    "method seconds": secs}              # as the method's own run recorded
                rows.setdefault(name, []).append(row)
            continue
        made = (cvae_methods(profile.mnist, FORGET[family], seed, progress) if family == "cvae"
                else ddpm_methods(profile.ddpm, FORGET[family], seed, progress))
        for name, (model, secs) in made.items():
            settings = {"family": family, "method": name, "model": model_key(model),
                        "seed": seed, "budget": budget}
            row = {**cached_row(family, settings, lambda: probe_class_conditional(
                model, clf, train, test, FORGET[family], ps, seed)), "method seconds": secs}
            rows.setdefault(name, []).append(row)
    if headline:
        save_json(_headline_path(family, profile), rows)
    return rows


def _headline_path(family: str, profile: Any) -> Path:
    return cache_dir() / f"probe-headline-{family}-{config_hash({'profile': repr(profile)})}.json"


def headline_rows(family: str, profile: Any) -> dict[str, list[dict]] | None:
    """The headline set's rows if ``probe_family(..., headline=True)`` ran on this machine for
    this profile (``benchmarks/probes.py``), else None."""
    path = _headline_path(family, profile)
    return json.loads(path.read_text()) if path.exists() else None


def show_headline(family: str, profile: Any) -> dict[str, list[dict]] | None:
    """Display the headline table (every method, >= 3 seeds) when this machine has it."""
    from IPython.display import HTML, display
    rows = headline_rows(family, profile)
    if rows is None:
        print(f"The headline table ({len(profile.probes.headline_seeds)} seeds"
              + (", every method" if family == "t2i" else "") + ") is not on this machine: "
              f"SA_KIT_PROFILE={profile.name} python benchmarks/probes.py {family} computes it.")
        return None
    seeds = len(next(iter(rows.values())))
    print(f"Headline table: {seeds} seeds, computed by benchmarks/probes.py on this machine")
    display(HTML(html_table(summarise(rows, columns(family, profile.probes)), seeds)))
    return rows


def _evaluator_and_test(family: str, profile: Any, progress: bool
                        ) -> tuple[nn.Module, ImageData, ImageData]:
    if family == "cvae":
        from sa_kit.chapters.mnist_cvae import mnist_splits, pretrained_classifier
        train, test = mnist_splits(verbose=False)
        return pretrained_classifier(train, profile.mnist, progress=progress), train, test
    from sa_kit.chapters.ddpm_digits import load_data, pretrained_classifier
    train, test = load_data(profile.ddpm, verbose=False).split(test_fraction=0.1, seed=0)
    return pretrained_classifier(train, profile.ddpm, progress=progress), train, test



def columns(family: str, sizes: ProbeSizes) -> list[str]:
    """The table's columns for a family, in reading order."""
    cols = ["P(c_f)"]
    if family == "t2i":
        cols += ["other digits acc", "P(c_f), numeral"]
    if family == "ddpm":
        cols += [f"P(c_f), w={w:g}" for w in sizes.guidance_scales]
    cols += ["inversion"] + (["inversion, fresh z"] if family == "cvae" else [])
    cols += [f"relearn k={k}" for k in sizes.relearn_k] + ["NLL c_f", "NLL others"]
    # the text-to-image runs record their own wall-clock time (the cVAE/DDPM caches do not)
    return cols + (["method seconds"] if family == "t2i" else [])


# ---- the explorer -----------------------------------------------------------------------------
class RelearnExplorer:
    """Relearning, one run per click: which model, how many real images, which learning rate.

    :meth:`run` is the plain callback (tested without a browser); every run is recorded in
    :meth:`table` and drawn by :meth:`plot` (P(c_f) against fine-tuning steps, one curve per
    run, the original model's P(c_f) as a reference line).
    """

    def __init__(self, models: Mapping[str, nn.Module], classifier: nn.Module, real: ImageData,
                 forget_class: int, sizes: ProbeSizes, seed: int = 0) -> None:
        if not models:
            raise ValueError("models must name at least one model")
        self.models, self.real, self.forget_class = dict(models), real, forget_class
        self.sizes, self.seed = sizes, seed
        self.judge = _judge(classifier, forget_class, sizes.samples, seed)
        self.runs: list[dict[str, Any]] = []
        self.reference = self.judge(self.models["original"]) if "original" in models else None

    def run(self, method: str, k: int, lr: float) -> dict[str, Any]:
        """Fine-tune ``method``'s model on ``k`` real images of c_f at ``lr``; record the run."""
        from sa_kit.checks import check_choice
        method = check_choice("method", method, list(self.models))
        real = self.real.x[self.real.y == self.forget_class]
        if not 1 <= int(k) <= len(real):
            raise ValueError(f"k must be in 1..{len(real)}, got {k}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        start = time.perf_counter()
        r = probes.relearn(self.models[method], real[:k], torch.full((int(k),), self.forget_class),
                           self.judge, checks=self.sizes.relearn_checks, lr=float(lr),
                           seed=self.seed)
        out = {"method": method, "k": int(k), "lr": float(lr), "steps": r["steps"],
               "curve": r["curve"], "seconds": time.perf_counter() - start}
        self.runs.append(out)
        return out

    def table(self) -> list[dict[str, Any]]:
        """One row per run: the settings, steps to P(c_f) >= 0.5 (None: not within budget)."""
        return [{k: v for k, v in r.items() if k != "curve"} for r in self.runs]

    def plot(self, ax: Any = None) -> Any:
        import matplotlib.pyplot as plt
        if ax is None:
            ax = plt.subplots(figsize=(6, 3.5))[1]
        for r in self.runs:
            steps, p = zip(*r["curve"])
            ax.plot(steps, p, marker="o", label=f"{r['method']}, k={r['k']}, lr={r['lr']:g}")
        if self.reference is not None:
            ax.axhline(self.reference, color="grey", ls=":", label="original model")
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set(xlabel="fine-tuning steps", ylabel="P(c_f)", ylim=(0, 1),
               title="relearning the forgotten class")
        ax.legend(fontsize=7)
        return ax

    def widget(self) -> Any:
        import ipywidgets as W
        import matplotlib.pyplot as plt
        method = W.Dropdown(options=list(self.models), value=next(iter(self.models)),
                            description="model")
        k = W.IntSlider(value=10, min=1, max=100, description="k images")
        lr = W.FloatLogSlider(value=self.sizes.relearn_lr, base=10, min=-5, max=-1,
                              description="lr")
        button, out = W.Button(description="Run relearning"), W.Output()

        def click(_: Any) -> None:
            with out:
                out.clear_output(wait=True)
                r = self.run(method.value, k.value, lr.value)
                print(f"{r['method']}, k={r['k']}: P(c_f) >= 0.5 after "
                      f"{r['steps'] if r['steps'] is not None else 'more than %d' % max(self.sizes.relearn_checks)}"
                      f" steps ({r['seconds']:.1f} s)")
                self.plot()
                plt.show()

        button.on_click(click)
        return W.VBox([W.HBox([method, k, lr, button]), out])
