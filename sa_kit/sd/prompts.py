"""Prompts for Stable Diffusion forgetting: the replay/Fisher set and forget -> surrogate maps.

The paper needs two prompt sets and no training data (eq. 1-3, :mod:`sa_kit.objective`):

* **replay / Fisher prompts** c ~ p_r(c): many diverse everyday prompts whose images, drawn
  from the frozen original model, feed generative replay (eq. 2) and the Fisher (eq. 3). The
  original code used ~5000 prompts; :func:`replay_prompts` makes any number, deterministically,
  from templates over subjects, places and styles (no download, no duplicates).
* **mapping pairs** for the surrogate term (eq. 1): the forget concept's prompts c_f paired with
  prompts of the surrogate ("brad pitt" -> "a middle aged man", nudity -> clothed people). The
  model is trained to draw, for c_f, the images that the original drew for the surrogate. By
  default the pairs are the official code's *bare* prompts: every surrogate image is drawn for
  the surrogate prompt itself and trained under the forget prompt (one of a comma-separated
  list, chosen per image, as ``sd/ldm/data/__init__.py: TextImageDataset`` does);
  ``templates=True`` wraps both in the same varied templates instead.

Example:
    >>> replay_prompts(2)
    ['a watercolor of a lighthouse on a frozen lake, at dawn', ...]  # doctest: +SKIP
    >>> mapping_pairs("brad pitt", "a middle aged man", 1)
    [('brad pitt', 'a middle aged man')]
"""
from __future__ import annotations

import random
from typing import Sequence

from sa_kit.checks import check_count as _check_count

SUBJECTS = (
    "a dog", "a cat", "a horse", "a fox", "an owl", "a parrot", "a lion", "a deer", "a rabbit",
    "a whale", "a butterfly", "a turtle", "a bicycle", "a red car", "a vintage truck",
    "a sailboat", "a steam train", "a hot air balloon", "an old lighthouse", "a wooden cabin",
    "a castle", "a bridge", "a windmill", "a greenhouse", "a bowl of fruit", "a cup of coffee",
    "a birthday cake", "a bouquet of flowers", "a stack of books", "a violin", "a grand piano",
    "an armchair", "a desk lamp", "a teapot", "a pair of boots", "a backpack", "a robot",
    "an astronaut", "a knight", "a chef", "a farmer", "a young woman", "an old man",
    "a group of children", "a firefighter", "a dancer", "a fisherman", "a mountain",
    "a waterfall", "a forest path", "a desert canyon", "a city skyline", "a market street",
    "a garden", "a volcano", "a snowy village", "a tropical beach", "an oak tree",
    "a field of sunflowers", "a river",
)
PLACES = (
    "in a park", "on a beach", "in the mountains", "in a busy city", "in a forest",
    "in a kitchen", "in a library", "on a frozen lake", "in the desert", "under the sea",
    "on a rooftop", "in a meadow", "at a train station", "in a museum", "on a farm",
    "in a snowy field", "by a river", "in a small village", "on a country road", "in a studio",
    "at the harbour", "in a cafe", "in a greenhouse", "on the moon", "in a cave",
)
STYLES = (
    "a photo", "a watercolor", "an oil painting", "a pencil sketch", "a digital illustration",
    "a 3d render", "a charcoal drawing", "a cinematic still", "a vintage postcard",
    "a pixel art image", "an ink drawing", "a studio portrait", "a polaroid", "a mosaic",
    "a low poly render", "a children's book illustration", "a pastel drawing",
    "a woodblock print", "a long exposure photo", "a matte painting",
)
LIGHTS = ("at dawn", "at sunset", "at night", "on a rainy day", "in soft light",
          "in bright sunlight", "in the fog", "in autumn")
TEMPLATES = (
    "{style} of {subject} {place}, {light}",
    "{style} of {subject} {place}",
    "{subject} {place}, {style}, {light}",
)

# Forget concept c_f -> surrogate (what it should draw instead); the paper's examples.
MAPPINGS = {
    "brad pitt": "a middle aged man",
    "angelina jolie": "a middle aged woman",
    "a naked person": "a person wearing clothes",
    "nudity": "people wearing clothes",
    "sexual, nudity, naked, erotic": "people wearing clothes",  # the official nudity prompts
    "van gogh": "a painting",
}

_TOTAL = len(TEMPLATES) * len(SUBJECTS) * len(PLACES) * len(STYLES) * len(LIGHTS)


def _decode(index: int) -> tuple[str, str]:
    """The ``index``-th prompt of the template grid, and its subject."""
    index, light = divmod(index, len(LIGHTS))
    index, style = divmod(index, len(STYLES))
    index, place = divmod(index, len(PLACES))
    template, subject = divmod(index, len(SUBJECTS))
    text = TEMPLATES[template].format(style=STYLES[style], subject=SUBJECTS[subject],
                                      place=PLACES[place], light=LIGHTS[light])
    return text, SUBJECTS[subject]


def check_count(name: str, n: object, most: int = _TOTAL) -> int:
    """``n`` as an int in ``1..most``, or a ValueError naming ``name``."""
    return _check_count(name, n, most)


def split_prompts(forget_prompt: str) -> list[str]:
    """The prompts of a comma-separated forget concept (``"sexual, nudity"`` -> two prompts)."""
    return [p.strip() for p in forget_prompt.split(",") if p.strip()]


def replay_prompts(n: int, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct, diverse prompts for generative replay and the Fisher (eq. 2, 3).

    Args:
        n: how many prompts (1 .. 100,000).
        seed: the same seed always gives the same list (and a longer list extends a shorter).
        exclude: words that must not appear (the forget concept itself, e.g. ``"brad pitt"``).

    Returns:
        A list of ``n`` unique prompts, spread evenly over subjects (round-robin).
    """
    check_count("n", n, 100_000)
    rng = random.Random(seed)
    banned = [w.lower() for w in exclude if w.strip()]
    out: list[str] = []
    seen: set[str] = set()
    subject_order = rng.sample(range(len(SUBJECTS)), len(SUBJECTS))
    rest = _TOTAL // len(SUBJECTS)
    while len(out) < n:
        for s in subject_order:  # one prompt per subject per round: diversity first
            text, _ = _decode(_reorder(s + len(SUBJECTS) * rng.randrange(rest)))
            if text in seen or any(b in text.lower() for b in banned):
                continue  # a template without {light} repeats; try again next round
            seen.add(text)
            out.append(text)
            if len(out) == n:
                break
    return out


def _reorder(i: int) -> int:
    """Map "subject-major" index ``i`` (subject = i mod #subjects) to the grid index."""
    subject, rest = i % len(SUBJECTS), i // len(SUBJECTS)
    template, inner = divmod(rest, len(PLACES) * len(STYLES) * len(LIGHTS))
    return (template * len(SUBJECTS) + subject) * len(PLACES) * len(STYLES) * len(LIGHTS) + inner


def check_mapping(forget_prompt: str, surrogate_prompt: str) -> tuple[str, str]:
    """Validate a forget -> surrogate pair: two non-empty, different strings.

    Raises:
        TypeError: if either is not a string.
        ValueError: if either is empty, or the surrogate equals the forget concept (eq. 1
            would then *train* the concept instead of replacing it).
    """
    for name, value in (("forget_prompt", forget_prompt), ("surrogate_prompt", surrogate_prompt)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{name} must be a non-empty string")
    if surrogate_prompt.strip().lower() in [p.lower() for p in split_prompts(forget_prompt)]:
        raise ValueError(f"surrogate_prompt equals the forget prompt {forget_prompt!r}; choose "
                         f"what the concept should turn into, e.g. {sorted(MAPPINGS.items())[0]}")
    return forget_prompt.strip(), surrogate_prompt.strip()


def surrogate_for(forget_prompt: str) -> str:
    """The default surrogate of a known concept (see ``MAPPINGS``), else a ValueError."""
    key = forget_prompt.strip().lower()
    if key not in MAPPINGS:
        raise ValueError(f"no default surrogate for {forget_prompt!r}; known concepts: "
                         f"{sorted(MAPPINGS)} (or pass surrogate_prompt explicitly)")
    return MAPPINGS[key]


def mapping_pairs(forget_prompt: str, surrogate_prompt: str, n: int, seed: int = 0,
                  templates: bool = False) -> list[tuple[str, str]]:
    """``n`` prompt pairs ``(c_f prompt, surrogate prompt)`` for the surrogate term (eq. 1).

    Images are drawn by the original model for the second prompt and trained under the first.
    By default (the official code) the pairs are bare: ``("brad pitt", "a middle aged man")``,
    the forget prompt drawn from its comma-separated list per pair. With ``templates=True`` the
    same template, place and style wrap both concepts, so that only the concept differs:
    ``("a photo of brad pitt in a park", "a photo of a middle aged man in a park")``.
    """
    forget_prompt, surrogate_prompt = check_mapping(forget_prompt, surrogate_prompt)
    rng = random.Random(seed)
    forgets = split_prompts(forget_prompt)
    if not templates:
        check_count("n", n, 1_000_000)
        return [(rng.choice(forgets), surrogate_prompt) for _ in range(n)]
    check_count("n", n, len(TEMPLATES) * len(PLACES) * len(STYLES) * len(LIGHTS))
    grid = len(PLACES) * len(STYLES) * len(LIGHTS)
    picks = rng.sample(range(len(TEMPLATES) * grid), n)
    pairs = []
    for p in picks:
        template, inner = divmod(p, grid)
        inner, light = divmod(inner, len(LIGHTS))
        place, style = divmod(inner, len(STYLES))
        fmt = dict(style=STYLES[style], place=PLACES[place], light=LIGHTS[light])
        pairs.append((TEMPLATES[template].format(subject=rng.choice(forgets), **fmt),
                      TEMPLATES[template].format(subject=surrogate_prompt, **fmt)))
    return pairs
