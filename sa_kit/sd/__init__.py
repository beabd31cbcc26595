"""Selective Amnesia for Stable Diffusion (chapter 3): a diffusers-native, resumable tool.

Stable Diffusion is the kit's third :class:`~sa_kit.objective.ForgettableModel` adapter
(:class:`sa_kit.sd.adapter.SDAdapter`); the loss, the Fisher estimators and the EWC penalty are
the same code as for the VAE and the DDPM.

* :mod:`~sa_kit.sd.pipeline` -- load by model id or folder; offline: a tiny random pipeline
  (``"tiny"``) or chapter 3's coloured-digit model (``"digits"``).
* :mod:`~sa_kit.sd.digits` -- that model: captioned coloured digits, a small
  ``StableDiffusionPipeline`` the kit trains on a CPU, a digit/colour evaluator.
* :mod:`~sa_kit.sd.prompts` -- a model's prompt spec (templates, words, held-out paraphrases);
  replay/Fisher prompt sets; forget -> surrogate mappings.
* :mod:`~sa_kit.sd.dataset` -- cached, resumable image/latent generation.
* :mod:`~sa_kit.sd.fisher` -- the UNet Fisher (sharded over processes), save/load.
* :mod:`~sa_kit.sd.forget` -- the training CLI::

      python -m sa_kit.sd.forget --config run.yaml
      accelerate launch -m sa_kit.sd.forget --config run.yaml

* :mod:`~sa_kit.sd.evaluate` -- before/after grids, optional NudeNet and CLIP scores::

      python -m sa_kit.sd.evaluate --run OUTPUT_DIR

* :mod:`~sa_kit.sd.explorer` -- chapter 3's explorer: short runs recorded in a table.
"""
