"""Stable Diffusion pipelines: a real model by id or folder, or a tiny offline one built in code.

``load_pipeline("CompVis/stable-diffusion-v1-4")`` loads real weights through diffusers (network
or the Hugging Face cache). ``load_pipeline("tiny")`` builds a *randomly initialised* pipeline
of the same architecture family -- UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a DDIM
scheduler and a CLIP tokenizer whose ``vocab.json``/``merges.txt`` the kit writes itself --
saves it with ``save_pretrained`` and reloads it with ``from_pretrained(local_files_only=True)``,
so that the whole code path of the real tool runs offline. Its images are noise: it shows the
mechanics only.

Example:
    >>> pipe = load_pipeline("tiny")                      # doctest: +SKIP
    >>> pipe(["a photo of a cat"], num_inference_steps=2).images[0].size
    (32, 32)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sa_kit.io import atomic_write, cache_dir, config_hash
from sa_kit.sd import prompts as P

TINY = "tiny"
DIGITS = "digits"     # chapter 3's coloured-digit model (cpu profile), trained on first use
TINY_UNET = dict(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                 attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
                block_out_channels=(4, 4, 8, 8), norm_num_groups=2, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                 num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0,
                 eos_token_id=1, pad_token_id=1, projection_dim=16)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _word_merges(words: set[str]) -> list[tuple[str, str]]:
    """Learn BPE merges (Sennrich et al.) until every word is one token.

    Standard BPE training: repeatedly merge the most frequent adjacent pair (ties broken
    alphabetically, so the files are deterministic). Encoding with these ranks reproduces the
    training segmentation, so every known word becomes a single ``word</w>`` token.
    """
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in corpus:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_merge(word, best) for word in corpus]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_tokenizer_files(folder: str | os.PathLike, words: set[str] | None = None) -> Path:
    """Write a CLIP ``vocab.json`` + ``merges.txt`` covering a prompt vocabulary.

    Every byte is a token (so any text tokenises); ``words`` (default: the words of the default
    prompt spec, :data:`sa_kit.sd.prompts.DEFAULT`) are single tokens.
    ``CLIPTokenizer.from_pretrained(folder)`` reads them.
    """
    folder = Path(folder)
    alphabet = list(_bytes_to_unicode().values())
    words = {w for w in (words if words is not None else P.DEFAULT.words()) if len(w) > 1}
    merges = _word_merges(words)
    vocab = alphabet + [a + "</w>" for a in alphabet]
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write(folder / "vocab.json", lambda t: Path(t).write_text(json.dumps(ids)))
    atomic_write(folder / "merges.txt", lambda t: Path(t).write_text(merges_txt))
    return folder


def sd_scheduler() -> Any:
    """Stable Diffusion v1's noise schedule (scaled-linear betas 0.00085..0.012, T = 1000), DDIM."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_tiny_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny random pipeline in code and ``save_pretrained`` it into ``folder``.

    32x32 RGB images, 4x4x4 latents (the VAE downsamples 8x, like SD), a 2-level UNet with
    cross-attention on 16-dim CLIP hidden states. Returns the folder.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = write_tokenizer_files(folder / "tokenizer")  # kept: older readers use them
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=sd_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_pipeline_dir(seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The cached folder of the tiny pipeline for ``seed`` (built once, then reused)."""
    key = config_hash({"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT, "seed": seed,
                       "version": 3})
    folder = Path(root) if root is not None else cache_dir() / f"sd-tiny-{key}"
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + f".building-{os.getpid()}")
        build_tiny_pipeline(tmp, seed)
        (tmp / "model_index.json").touch()
        try:
            os.replace(tmp, folder)  # atomic: a half-built folder is never used
        except OSError:              # another process finished first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_model_source(model: Any) -> str:
    """``model`` if it can be loaded here: ``"tiny"``, a pipeline folder, or a reachable hub id.

    Raises:
        ValueError: a folder that is not a Stable Diffusion pipeline, a name that is not a hub
            id, or (offline) a hub id that is not in the Hugging Face cache.
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ValueError(f"model must be 'tiny', 'digits', a pipeline folder or a model id, got {model!r}")
    model = str(model)
    if model in (TINY, DIGITS):
        return model
    path = Path(model).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"model folder {model} is not a diffusers pipeline (no "
                             "model_index.json)")
        try:
            kind = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, ValueError):
            raise ValueError(f"model folder {model} has an unreadable model_index.json") from None
        if "StableDiffusion" not in kind:
            raise ValueError(f"model folder {model} holds a {kind or 'unknown'} pipeline, not a "
                             "Stable Diffusion one (text-to-image, UNet2DConditionModel)")
        return model
    parts = model.split("/")
    if len(parts) != 2 or not all(parts) or model.startswith((".", "~")):
        raise ValueError(f"model {model!r} is neither 'tiny', 'digits', an existing pipeline folder, nor a "
                         "hub id such as 'CompVis/stable-diffusion-v1-4'")
    from sa_kit.data import offline
    if offline() or os.environ.get("HF_HUB_OFFLINE", "") == "1":
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            raise ValueError(f"model {model!r} is not in the Hugging Face cache and downloads are "
                             "off (SA_KIT_OFFLINE / HF_HUB_OFFLINE); use 'tiny' or a local folder")
    return model


def model_folder(model: str | os.PathLike) -> str | os.PathLike:
    """Where ``model`` loads from: the folders of ``"tiny"`` and ``"digits"`` (built on first use,
    then cached), anything else unchanged."""
    if str(model) == TINY:
        return tiny_pipeline_dir()
    if str(model) == DIGITS:
        from sa_kit.sd.digits import T2ISizes, pipeline_dir
        return pipeline_dir(T2ISizes())
    return model


def load_pipeline(model: str | os.PathLike = TINY, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, local_files_only: bool | None = None
                  ) -> Any:
    """Load a ``StableDiffusionPipeline``: ``"tiny"``, a local folder, or a hub model id.

    Args:
        model: ``"tiny"`` (the offline random pipeline), ``"digits"`` (chapter 3's coloured-digit
            model; trained on first use, about 7 minutes on 2 cores), a folder written by
            ``save_pretrained`` (e.g. the output of ``python -m sa_kit.sd.forget``), or a model
            id such as ``"CompVis/stable-diffusion-v1-4"`` (needs the network or the HF cache).
        device, dtype: where and in which precision to put the weights.
        local_files_only: default True for ``"tiny"``, folders and ``SA_KIT_OFFLINE=1``;
            False for model ids (download or the HF cache).

    Returns:
        The pipeline, with the safety checker off, progress bars off and a DDIM scheduler.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ValueError(f"model must be 'tiny', 'digits', a folder or a model id, got {model!r}")
    source = model_folder(model)
    from sa_kit.data import offline
    local = (Path(source).is_dir() or offline()) if local_files_only is None else local_files_only
    from diffusers.utils import logging as dlog
    dlog.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None,
                                                   requires_safety_checker=False,
                                                   dtype=dtype, local_files_only=local)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_tiny(pipe: Any) -> bool:
    """True for the tiny random pipeline (its images are noise)."""
    return int(pipe.unet.config.sample_size) == TINY_UNET["sample_size"] and \
        tuple(pipe.unet.config.block_out_channels) == TINY_UNET["block_out_channels"]
