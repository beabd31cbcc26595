"""What each chapter builds and caches, one module per chapter.

* :mod:`~sa_kit.chapters.mnist_cvae` -- chapter 1 and the demo: MNIST, the cVAE, the paper's
  evaluator, the Fisher, forgetting runs.
* :mod:`~sa_kit.chapters.ddpm_digits` -- chapter 2: CIFAR-10 or the offline digits, the DDPM, its
  evaluator, the diffusion Fisher, forgetting runs.
* :mod:`~sa_kit.chapters.text_to_image` -- chapter 3: the coloured-digit text-to-image model,
  its digit/colour evaluator, forgetting runs through the Stable Diffusion training tool.

Every function is cached under ``SA_KIT_CACHE`` and keyed by everything that made its result.
"""
