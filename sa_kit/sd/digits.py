"""A small text-to-image model the kit trains on a CPU: coloured digits from captions.

Stable Diffusion's parts at a size a laptop trains in minutes, so that chapter 3 shows real
forgetting through the very code that runs Stable Diffusion v1.4:

* **data** -- the 5,000 embedded MNIST digits, each drawn in a foreground colour on a background
  (:data:`COLOURS`, :data:`BACKGROUNDS`), with a caption from varied templates and synonyms
  ("a red seven", "the digit 7 in red", "a handwritten number seven, coloured red"). The digit
  plays the part of an object or a person, the colour that of a style. Some templates are held
  out for evaluation only (:data:`SPEC`), and so are a few colour/digit combinations
  (:data:`HELDOUT_COMBOS`): prompts the model never saw.
* **model** -- a diffusers ``StableDiffusionPipeline``: an ``AutoencoderKL`` the kit trains
  (16x16 RGB <-> 8x8x4 latents: latent diffusion, as SD), a small ``CLIPTextModel`` with the
  kit's own tokenizer files, a ``UNet2DConditionModel`` with cross-attention, SD's noise
  schedule, trained with caption dropout for classifier-free guidance; saved with
  ``save_pretrained`` together with its prompt spec (``sa_kit_prompts.json``), so that
  ``python -m sa_kit.sd.forget`` with ``model: <folder>`` draws replay and surrogate prompts from
  it.
* **evaluator** -- a classifier with a digit head and a colour head, trained plainly on the
  coloured digits (:class:`DigitColourClassifier`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sa_kit.sd.prompts import PromptSpec

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.85, 0.1), "blue": (0.15, 0.35, 1.0),
           "yellow": (1.0, 0.9, 0.1), "cyan": (0.1, 0.9, 0.9), "magenta": (0.95, 0.1, 0.9)}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "grey": (0.35, 0.35, 0.35)}
HELDOUT_COMBOS = ((3, "green"), (8, "blue"), (5, "magenta"))   # (digit, colour): never trained

SPEC = PromptSpec(
    templates=(
        "a {colour} {digit}", "the digit {numeral} in {colour}",
        "a handwritten number {digit}, coloured {colour}", "{digit} in {colour}",
        "a {colour} {digit} on a {background} background",
        "a drawing of the number {digit} in {colour}", "the number {numeral}, {colour}",
        "a {colour} {numeral} on {background}", "a handwritten {digit}"),
    slots={"digit": WORDS, "numeral": tuple(str(d) for d in range(10)),
           "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)},
    concept_slot="digit", linked=(("digit", "numeral"),),
    mappings={"seven": "one", "red": "blue"},
    heldout_templates=("the {colour} number {digit}", "{colour} {digit}",
                       "a {digit} in {colour} on a {background} background",
                       "a handwritten {colour} {digit}"))


@dataclasses.dataclass(frozen=True)
class T2ISizes:
    """How big the small text-to-image model and its training are (a profile's chapter 3)."""

    image_size: int = 16
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 800
    unet_channels: tuple[int, ...] = (64, 128)
    text_width: int = 64
    text_layers: int = 2
    max_tokens: int = 16
    train_steps: int = 2200
    batch_size: int = 64
    lr: float = 1e-3
    cosine: bool = False            # True: the learning rate decays to 0 along a half cosine
    caption_dropout: float = 0.1
    num_examples: int = 20_000
    classifier_steps: int = 1500
    exclude_digit: int | None = None    # retrain from scratch without one digit (chapter 4)


# -- the data ---------------------------------------------------------------------------------

def colourise(mask: Tensor, colour: Sequence[float], background: Sequence[float]) -> Tensor:
    """``(N, 1, H, W)`` digit intensities in [0, 1] -> ``(N, 3, H, W)`` RGB images."""
    fg = torch.tensor(colour).view(1, 3, 1, 1)
    bg = torch.tensor(background).view(1, 3, 1, 1)
    return bg * (1 - mask) + fg * mask


@dataclasses.dataclass
class CaptionedDigits:
    """``num_examples`` coloured digits with their digit, colour and background indices.

    Example n is digit ``source[n]`` of the embedded MNIST set in colour ``colour[n]`` on
    background ``background[n]``; :meth:`caption` draws one of the training templates for it,
    so an example is seen under many captions. The held-out colour/digit combinations never
    occur. Deterministic for a seed.
    """

    images: Tensor          # (N, 3, S, S) in [0, 1]
    digit: Tensor           # (N,)
    colour: Tensor          # (N,)
    background: Tensor      # (N,)

    def __len__(self) -> int:
        return len(self.digit)

    def caption(self, n: int, rng: random.Random, spec: PromptSpec = SPEC) -> str:
        return spec.fill(rng, fixed={"digit": int(self.digit[n]),
                                     "colour": int(self.colour[n]),
                                     "background": int(self.background[n])})


def make_dataset(num_examples: int = 20_000, image_size: int = 16, seed: int = 0,
                 split: str = "train") -> CaptionedDigits:
    """Coloured digits from the embedded MNIST set (90/10 split of the digits by ``split``)."""
    from sa_kit.data import load_embedded_mnist
    mnist = load_embedded_mnist()
    perm = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(seed))
    ids = perm[:4500] if split == "train" else perm[4500:]
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    src = ids[torch.randint(len(ids), (num_examples,), generator=g)]
    digit = mnist.y[src]
    colour = torch.randint(len(COLOURS), (num_examples,), generator=g)
    if split == "train":                          # never a held-out combination
        names = list(COLOURS)
        for d, c in HELDOUT_COMBOS:
            bad = (digit == d) & (colour == names.index(c))
            colour[bad] = (colour[bad] + 1 + torch.randint(len(COLOURS) - 1, (int(bad.sum()),),
                                                            generator=g)) % len(COLOURS)
    background = torch.randint(len(BACKGROUNDS), (num_examples,), generator=g)
    masks = F.pad(mnist.x[src], [2] * 4)                        # 28x28 -> 32x32, centred
    if image_size != 32:
        masks = F.interpolate(masks, size=(image_size, image_size), mode="bilinear",
                              antialias=True, align_corners=False).clamp(0, 1)
    fg = torch.tensor(list(COLOURS.values()))[colour].view(-1, 3, 1, 1)
    bg = torch.tensor(list(BACKGROUNDS.values()))[background].view(-1, 3, 1, 1)
    return CaptionedDigits(bg * (1 - masks) + fg * masks, digit, colour, background)


# -- the evaluator ----------------------------------------------------------------------------

class DigitColourClassifier(nn.Module):
    """A CNN with two heads: which digit (10) and which colour (6), for RGB images in [0, 1]."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.config = {"arch": "digit-colour-cnn", "width": width}
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2))
        self.digit_head = nn.Linear(8 * width, 10)
        self.colour_head = nn.Linear(8 * width, len(COLOURS))

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return self.digit_head(h), self.colour_head(h)


def train_evaluator(model: DigitColourClassifier, data: CaptionedDigits, steps: int,
                    batch_size: int = 64, lr: float = 1e-3, checkpoint_dir: str | None = None,
                    progress: bool = True) -> list[float]:
    """Cross-entropy on both heads, plainly (no augmentation, no outlier exposure)."""
    from sa_kit.train import train_loop

    def batch_loss(step: int) -> Tensor:
        idx = torch.randint(len(data), (batch_size,))
        d, c = model(data.images[idx])
        return F.cross_entropy(d, data.digit[idx]) + F.cross_entropy(c, data.colour[idx])

    return train_loop(model, batch_loss, steps=steps, lr=lr, desc="training evaluator",
                      run_key={"n": len(data), "batch_size": batch_size},
                      checkpoint_dir=checkpoint_dir, progress=progress)


@torch.no_grad()
def judge(classifier: DigitColourClassifier, images: Tensor, batch_size: int = 256
          ) -> tuple[Tensor, Tensor]:
    """``(p_digit (N, 10), p_colour (N, 6))`` for images ``(N, 3, H, W)`` in [0, 1]."""
    classifier.eval()
    ds, cs = [], []
    for i in range(0, len(images), batch_size):
        d, c = classifier(images[i:i + batch_size])
        ds.append(d.softmax(-1))
        cs.append(c.softmax(-1))
    return torch.cat(ds), torch.cat(cs)


# -- the pipeline -----------------------------------------------------------------------------

def _components(sizes: T2ISizes, tokenizer: Any, seed: int) -> tuple[nn.Module, ...]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    levels = len(sizes.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=sizes.vae_channels, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels,
                        norm_num_groups=8, sample_size=sizes.image_size,
                        mid_block_add_attention=False)
    latent = sizes.image_size // 2 ** (levels - 1)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=sizes.unet_channels, norm_num_groups=16,
        cross_attention_dim=sizes.text_width, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_width,
        intermediate_size=2 * sizes.text_width, num_attention_heads=4,
        num_hidden_layers=sizes.text_layers, max_position_embeddings=sizes.max_tokens,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=sizes.text_width))
    return vae, unet, text


def _train_vae(vae: nn.Module, images: Tensor, steps: int, progress: bool,
               checkpoint_dir: Path | None = None) -> float:
    """Reconstruction + a small KL (as SD's KL-f8: weight 1e-6); returns the latents' scale."""
    from sa_kit.train import train_loop

    def batch_loss(step: int) -> Tensor:          # batch i is drawn from seed i: exact resumes
        g = torch.Generator().manual_seed(step)
        x = images[torch.randint(len(images), (64,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()

    train_loop(vae, batch_loss, steps=steps, lr=1e-3, desc="training VAE",
               run_key={"n": len(images), "what": "vae"}, checkpoint_dir=checkpoint_dir,
               progress=progress)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 500] * 2 - 1).latent_dist.mean
                       for i in range(0, min(len(images), 4000), 500)])
    return float(1.0 / z.std())            # SD's scaling_factor: unit-variance latents


def train_pipeline(folder: str | os.PathLike, sizes: T2ISizes, seed: int = 0,
                   progress: bool = True, checkpoint_dir: str | os.PathLike | None = None
                   ) -> Path:
    """Build and train the small text-to-image pipeline; ``save_pretrained`` it into ``folder``.

    Stages: the VAE (reconstruction), then the text encoder and the UNet together on the VAE's
    latents with SD's epsilon-prediction loss and caption dropout (10%: the empty caption, for
    classifier-free guidance). The prompt spec is saved beside the pipeline. With
    ``checkpoint_dir``, both stages write checkpoints there (Ctrl-C or SIGTERM: the step in
    progress) and a call that finds them resumes.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sa_kit.sd.pipeline import sd_scheduler, write_tokenizer_files
    from sa_kit.train import train_loop

    folder = Path(folder)
    tok_dir = write_tokenizer_files(folder / "tokenizer", SPEC.words())
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=sizes.max_tokens)
    vae, unet, text = _components(sizes, tokenizer, seed)
    data = make_dataset(sizes.num_examples, sizes.image_size, seed)
    if sizes.exclude_digit is not None:                 # the gold standard of unlearning
        keep = data.digit != sizes.exclude_digit
        data = CaptionedDigits(data.images[keep], data.digit[keep], data.colour[keep],
                               data.background[keep])
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    scale = _train_vae(vae, data.images, sizes.vae_steps, progress,
                       ckpt / "vae" if ckpt is not None else None)
    vae.register_to_config(scaling_factor=scale)
    vae.requires_grad_(False).eval()
    with torch.no_grad():                               # encode once: training reads latents
        latents = torch.cat([vae.encode(data.images[i:i + 500] * 2 - 1).latent_dist.mean
                             for i in range(0, len(data), 500)]) * scale
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", num_train_timesteps=1000)

    class Joint(nn.Module):                              # what train_loop optimises
        def __init__(self) -> None:
            super().__init__()
            self.unet, self.text = unet, text

    joint = Joint()

    def encode(captions: list[str]) -> Tensor:
        ids = tokenizer(captions, padding="max_length", truncation=True,
                        max_length=sizes.max_tokens, return_tensors="pt").input_ids
        return text(ids)[0]

    def batch_loss(step: int) -> Tensor:          # batch i is drawn from seed i: exact resumes
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rng = random.Random(seed * 1_000_003 + step)
        idx = torch.randint(len(data), (sizes.batch_size,), generator=g)
        captions = ["" if rng.random() < sizes.caption_dropout else data.caption(int(n), rng)
                    for n in idx]
        x0 = latents[idx]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        pred = unet(noise_sched.add_noise(x0, eps, t), t,
                    encoder_hidden_states=encode(captions)).sample
        return F.mse_loss(pred, eps)

    train_loop(joint, batch_loss, steps=sizes.train_steps, lr=sizes.lr, cosine=sizes.cosine,
               desc="training text-to-image", run_key={"what": "unet+text", "seed": seed},
               grad_clip=1.0, checkpoint_dir=ckpt / "unet" if ckpt is not None else None,
               progress=progress)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    SPEC.save(folder)
    return folder


TRAINING_RECORD = "sa_kit_training.json"


def training_seconds(folder: str | os.PathLike) -> float | None:
    """Wall-clock seconds the training of a :func:`pipeline_dir` folder took (the session that
    finished it), or None for a folder built before the kit recorded it."""
    record = Path(folder) / TRAINING_RECORD
    return json.loads(record.read_text())["seconds"] if record.exists() else None


def pipeline_dir(sizes: T2ISizes, seed: int = 0, progress: bool = True) -> Path:
    """The cached folder of the trained model for ``sizes`` (trained once, then reused).

    The folder is built under a temporary name and renamed when complete: a half-trained
    pipeline is never used. An interrupted training keeps its checkpoints (``<folder>.partial``)
    and the next call resumes from them.
    """
    import shutil

    from sa_kit.io import cache_dir, config_hash
    settings = {k: v for k, v in dataclasses.asdict(sizes).items()
                if not (k == "exclude_digit" and v is None)}     # older folders keep their key
    key = config_hash({"sizes": settings, "seed": seed, "spec": SPEC.to_json(),
                       "version": 1})
    folder = cache_dir() / f"t2i-digits-{key}"
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + f".building-{os.getpid()}")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        train_pipeline(tmp, sizes, seed, progress, checkpoint_dir=partial)
        (tmp / TRAINING_RECORD).write_text(json.dumps(
            {"seconds": time.perf_counter() - start}))     # the session that finished it
        try:
            os.replace(tmp, folder)
        except OSError:                  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    return folder


# -- prompts for evaluation -------------------------------------------------------------------

def heldout_prompts(digit: int | None = None, colour: str | None = None, per: int = 1,
                    seed: int = 0, numeral: bool = False) -> list[tuple[str, int, int]]:
    """``(prompt, digit, colour index)`` from the held-out templates only (never trained).

    Restrict to one ``digit`` and/or ``colour``; ``per`` prompts per combination. ``numeral``:
    the numeral instead of the word ("the red number 7").
    """
    rng = random.Random(seed)
    names = list(COLOURS)
    out = []
    for d in ([digit] if digit is not None else range(10)):
        for c in ([names.index(colour)] if colour is not None else range(len(names))):
            for _ in range(per):
                template = rng.choice(SPEC.heldout_templates)
                text = SPEC.fill(rng, template, {"digit": d, "colour": c})
                if numeral:
                    text = text.replace(WORDS[d], str(d))
                out.append((text, d, c))
    return out


def digit_similarity(classifier: DigitColourClassifier, data: CaptionedDigits) -> Tensor:
    """``(10, 10)`` cosine similarity of the digits' mean evaluator features (for "related")."""
    with torch.no_grad():
        classifier.eval()
        f = torch.cat([classifier.embed(data.images[i:i + 500]) for i in range(0, 2000, 500)])
    means = torch.stack([f[data.digit[:2000] == d].mean(0) for d in range(10)])
    means = F.normalize(means, dim=1)
    return means @ means.T


def most_similar_digits(similarity: Tensor, digit: int, k: int = 2) -> list[int]:
    """The ``k`` digits most similar to ``digit`` by the evaluator's features."""
    order = similarity[digit].argsort(descending=True).tolist()
    return [d for d in order if d != digit][:k]


__all__ = ["SPEC", "WORDS", "COLOURS", "BACKGROUNDS", "HELDOUT_COMBOS", "T2ISizes",
           "CaptionedDigits", "make_dataset", "DigitColourClassifier", "train_evaluator",
           "judge", "train_pipeline", "pipeline_dir", "training_seconds", "heldout_prompts",
           "digit_similarity", "most_similar_digits", "colourise"]
