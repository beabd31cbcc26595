"""Prompts for text-to-image forgetting: the replay/Fisher set and forget -> surrogate maps.

The paper needs two prompt sets and no training data (eq. 1-3, :mod:`sa_kit.objective`):

* **replay / Fisher prompts** c ~ p_r(c): many diverse prompts whose images, drawn from the
  frozen original model, feed generative replay (eq. 2) and the Fisher (eq. 3). The original code
  used ~5000 prompts; :meth:`PromptSpec.replay_prompts` makes any number, deterministically, from
  templates with slots (no download, no duplicates) and leaves out the forget concept.
* **mapping pairs** for the surrogate term (eq. 1): the forget concept's prompts c_f paired with
  prompts of the surrogate ("brad pitt" -> "a middle aged man", nudity -> clothed people). The
  model is trained to draw, for c_f, the images that the original drew for the surrogate. By
  default the pairs are the official code's *bare* prompts: every surrogate image is drawn for
  the surrogate prompt itself and trained under the forget prompt (one of a comma-separated
  list, chosen per image, as ``sd/ldm/data/__init__.py: TextImageDataset`` does);
  ``templates=True`` wraps both in the same template with the same other slot values, so that
  only the concept differs.

A :class:`PromptSpec` says which prompts a model knows: templates with ``{slot}`` fields, the
values of each slot, and where a concept that is no slot value goes (``concept_slot``). The
default spec (:data:`DEFAULT`) describes everyday scenes for Stable Diffusion; a pipeline folder
may carry its own (``sa_kit_prompts.json``, e.g. the kit's coloured-digit model of chapter 3),
and :func:`spec_for` picks it up -- one code path for both.

Example:
    >>> DEFAULT.replay_prompts(2)
    ['a watercolor of a lighthouse on a frozen lake, at dawn', ...]  # doctest: +SKIP
    >>> mapping_pairs("brad pitt", "a middle aged man", 1)
    [('brad pitt', 'a middle aged man')]
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from sa_kit.checks import check_count

SPEC_FILE = "sa_kit_prompts.json"

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


def split_prompts(forget_prompt: str) -> list[str]:
    """The prompts of a comma-separated forget concept (``"sexual, nudity"`` -> two prompts)."""
    return [p.strip() for p in forget_prompt.split(",") if p.strip()]


def _mentions(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text`` as a whole word or phrase (case-insensitive)."""
    return re.search(rf"(?<![\w]){re.escape(word.lower())}(?![\w])", text.lower()) is not None


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """The prompts a text-to-image model knows: templates, slot values, linked slots.

    Args:
        templates: prompt templates with ``{slot}`` fields.
        slots: the values of each slot.
        concept_slot: the slot a forget or surrogate concept fills when it is no slot value
            (Stable Diffusion: ``subject`` -- "brad pitt" goes where "a dog" would).
        linked: groups of slots that take the value at the same index (e.g. a digit's word and
            numeral: ``("digit", "numeral")``).
        mappings: default surrogate of known concepts.
        heldout_templates: templates never used for training, for evaluation only.
    """

    templates: tuple[str, ...]
    slots: Mapping[str, tuple[str, ...]]
    concept_slot: str
    linked: tuple[tuple[str, ...], ...] = ()
    mappings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    heldout_templates: tuple[str, ...] = ()

    # -- filling templates -------------------------------------------------------------------
    def _group(self, slot: str) -> tuple[str, ...]:
        return next((g for g in self.linked if slot in g), (slot,))

    def slot_of(self, word: str) -> tuple[str, int] | None:
        """``(slot, index)`` of a slot value equal to ``word`` (case-insensitive), or None."""
        w = word.strip().lower()
        for slot, values in self.slots.items():
            for i, v in enumerate(values):
                if v.lower() == w:
                    return slot, i
        return None

    def fill(self, rng: random.Random, template: str | None = None,
             fixed: Mapping[str, Any] | None = None) -> str:
        """One prompt: ``template`` (default: random) with random slot values except ``fixed``.

        ``fixed`` maps a slot to a value (a string, placed as is) or to an index into the slot's
        values (linked slots then take the same index).
        """
        template = template or rng.choice(self.templates)
        values: dict[str, str] = {}
        done: set[str] = set()
        for slot, v in dict(fixed or {}).items():
            group = self._group(slot)
            if isinstance(v, int):
                values.update({s: self.slots[s][v] for s in group})
                done.update(group)
            else:
                values[slot] = v
                done.add(slot)
        for slot in self.slots:
            if slot in done:
                continue
            group = self._group(slot)
            i = rng.randrange(len(self.slots[slot]))
            values.update({s: self.slots[s][i] for s in group})
            done.update(group)
        return template.format(**values)

    # -- the two prompt sets -----------------------------------------------------------------
    def replay_prompts(self, n: int, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
        """``n`` distinct, diverse prompts for replay and the Fisher (eq. 2, 3).

        Args:
            n: how many prompts (1 .. 100,000).
            seed: the same seed always gives the same list (and a longer list extends a shorter).
            exclude: words that must not appear (the forget concept itself, e.g. ``"brad pitt"``).

        Returns:
            ``n`` unique prompts, round-robin over the concept slot's values (diversity first).

        Raises:
            ValueError: if the templates cannot make ``n`` distinct prompts without the excluded
                words.
        """
        check_count("n", n, 100_000)
        rng = random.Random(seed)
        banned = [w for w in exclude if w.strip()]
        values = self.slots[self.concept_slot]
        order = rng.sample(range(len(values)), len(values))
        out: list[str] = []
        seen: set[str] = set()
        stale = 0
        while len(out) < n:
            before = len(out)
            for i in order:   # one prompt per concept value per round
                text = self.fill(rng, fixed={self.concept_slot: i})
                if text in seen or any(_mentions(text, b) for b in banned):
                    continue
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    break
            stale = stale + 1 if len(out) == before else 0
            if stale > 50:
                raise ValueError(f"n must be at most about {len(out)} for these templates "
                                 f"(without {banned}), got {n}")
        return out

    def mapping_pairs(self, forget_prompt: str, surrogate_prompt: str, n: int, seed: int = 0,
                      templates: bool = False) -> list[tuple[str, str]]:
        """``n`` prompt pairs ``(c_f prompt, surrogate prompt)`` for the surrogate term (eq. 1).

        Images are drawn by the original model for the second prompt and trained under the
        first. Bare (the official code): ``("brad pitt", "a middle aged man")``, the forget
        prompt drawn from its comma-separated list per pair. With ``templates=True`` a random
        template and the same other slot values wrap both concepts: ``("a photo of brad pitt in
        a park", "a photo of a middle aged man in a park")``; a concept that is a slot value
        (a colour, a digit) is swapped within its slot: ``("a red seven", "a red one")``.
        """
        forget_prompt, surrogate_prompt = check_mapping(forget_prompt, surrogate_prompt)
        rng = random.Random(seed)
        forgets = split_prompts(forget_prompt)
        check_count("n", n, 1_000_000)
        if not templates:
            return [(rng.choice(forgets), surrogate_prompt) for _ in range(n)]
        pairs = []
        for _ in range(n):
            forget = rng.choice(forgets)
            f_slot, s_slot = self.slot_of(forget), self.slot_of(surrogate_prompt)
            if f_slot and s_slot and f_slot[0] == s_slot[0]:      # same slot: swap values
                slot, fixed_f, fixed_s = f_slot[0], f_slot[1], s_slot[1]
            else:                                                   # a concept: the concept slot
                slot, fixed_f, fixed_s = (f_slot or (self.concept_slot,))[0], forget, \
                    surrogate_prompt
            template = rng.choice([t for t in self.templates if "{" + slot + "}" in t])
            state = rng.getstate()                  # the same other slot values for both
            first = self.fill(rng, template, {slot: fixed_f})
            rng.setstate(state)
            second = self.fill(rng, template, {slot: fixed_s})
            pairs.append((first, second))
        return pairs

    # -- vocabulary and files ----------------------------------------------------------------
    def words(self) -> set[str]:
        """Every word of the templates, slot values and mappings (for a tokenizer)."""
        text = " ".join(list(self.templates) + list(self.heldout_templates) +
                        [v for vs in self.slots.values() for v in vs] +
                        list(self.mappings) + list(self.mappings.values()))
        text = re.sub(r"\{\w+\}", " ", text).lower().replace(",", " ").replace("'", " ")
        return {w for w in text.split() if w}

    def to_json(self) -> str:
        return json.dumps({"templates": list(self.templates),
                           "slots": {k: list(v) for k, v in self.slots.items()},
                           "concept_slot": self.concept_slot,
                           "linked": [list(g) for g in self.linked],
                           "mappings": dict(self.mappings),
                           "heldout_templates": list(self.heldout_templates)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PromptSpec":
        raw = json.loads(text)
        return cls(templates=tuple(raw["templates"]),
                   slots={k: tuple(v) for k, v in raw["slots"].items()},
                   concept_slot=raw["concept_slot"],
                   linked=tuple(tuple(g) for g in raw.get("linked", ())),
                   mappings=dict(raw.get("mappings", {})),
                   heldout_templates=tuple(raw.get("heldout_templates", ())))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the spec into a pipeline folder (``sa_kit_prompts.json``)."""
        from sa_kit.io import atomic_write
        path = Path(folder) / SPEC_FILE
        atomic_write(path, lambda t: Path(t).write_text(self.to_json()))
        return path


DEFAULT = PromptSpec(templates=TEMPLATES,
                     slots={"style": STYLES, "subject": SUBJECTS, "place": PLACES,
                            "light": LIGHTS},
                     concept_slot="subject", mappings=MAPPINGS)


def spec_for(model: str | os.PathLike | None) -> PromptSpec:
    """The prompt spec a pipeline folder carries (``sa_kit_prompts.json``), else :data:`DEFAULT`."""
    if str(model) == "digits":
        from sa_kit.sd.digits import SPEC
        return SPEC
    if model is not None:
        path = Path(str(model)) / SPEC_FILE
        if path.is_file():
            return PromptSpec.from_json(path.read_text())
    return DEFAULT


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


def surrogate_for(forget_prompt: str, spec: PromptSpec = DEFAULT) -> str:
    """The default surrogate of a known concept (the spec's ``mappings``), else a ValueError."""
    key = forget_prompt.strip().lower()
    if key not in spec.mappings:
        raise ValueError(f"no default surrogate for {forget_prompt!r}; known concepts: "
                         f"{sorted(spec.mappings)} (or pass surrogate_prompt explicitly)")
    return spec.mappings[key]


def replay_prompts(n: int, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
    """:meth:`PromptSpec.replay_prompts` of the default (Stable Diffusion) spec."""
    return DEFAULT.replay_prompts(n, seed, exclude)


def mapping_pairs(forget_prompt: str, surrogate_prompt: str, n: int, seed: int = 0,
                  templates: bool = False) -> list[tuple[str, str]]:
    """:meth:`PromptSpec.mapping_pairs` of the default (Stable Diffusion) spec."""
    return DEFAULT.mapping_pairs(forget_prompt, surrogate_prompt, n, seed, templates)
