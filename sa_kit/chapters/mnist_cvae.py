"""Chapter 1's building blocks: the data, the trained cVAE, its evaluators and its Fisher.

Each step is cached (safetensors, keyed by a hash of everything that made it), so the demo, the
notebook and the explorer share one trained model and one Fisher, and a rerun takes seconds.
Each step seeds itself, so cached and fresh runs give the same numbers downstream.
"""
from __future__ import annotations

import copy
from typing import Any

from sa_kit import seed_everything
from sa_kit.data import ImageData, load_mnist
from sa_kit.fisher import Fisher, cached_fisher, model_fisher
from sa_kit.forget import NonFiniteLossError, forget_one_class, naive_forget
from sa_kit.io import (cache_dir, config_hash, load_cached, load_or_train, load_tensors,
                       save_tensors, weights_fingerprint)
from sa_kit.mappings import mapping_key
from sa_kit.models.classifier import (MNISTClassifier, OutlierAwareClassifier,
                                      train_classifier)
from sa_kit.models.cvae import ConditionalVAE, train_cvae
from sa_kit.profiles import MNISTSizes

__all__ = ["mnist_splits", "pretrained_cvae", "pretrained_classifier",
           "outlier_aware_classifier", "cvae_fisher", "forgotten_cvae"]


def mnist_splits(seed: int = 0, verbose: bool = True) -> tuple[ImageData, ImageData]:
    """MNIST shuffled (seeded) and split 90/10 into train and test."""
    return load_mnist(verbose=verbose).split(test_fraction=0.1, seed=seed)


def _data_tag(data: ImageData) -> dict[str, Any]:
    return {"source": data.source, "n": len(data)}


def pretrained_cvae(train: ImageData, sizes: MNISTSizes, device: str = "cpu", seed: int = 0,
                    progress: bool = True) -> ConditionalVAE:
    """The original model theta*: a cVAE trained on ``train`` (loaded from cache if made)."""
    seed_everything(seed)
    config = {"steps": sizes.train_steps, "seed": seed, **_data_tag(train)}
    model = ConditionalVAE().to(device)
    return load_or_train("mnist_cvae", model, config, lambda m, ckpt: train_cvae(
        m, train.x, train.y, sizes.train_steps, checkpoint_dir=ckpt, progress=progress))


def pretrained_classifier(train: ImageData, sizes: MNISTSizes, device: str = "cpu",
                          seed: int = 0, progress: bool = True) -> MNISTClassifier:
    """The paper's evaluator: its MNIST CNN trained plainly on real digits (cached)."""
    seed_everything(seed)
    config = {"steps": sizes.classifier_steps, "seed": seed, "recipe": "official",
              **_data_tag(train)}
    model = MNISTClassifier().to(device)
    return load_or_train("mnist_classifier", model, config, lambda m, ckpt: train_classifier(
        m, train.x, train.y, sizes.classifier_steps, checkpoint_dir=ckpt, progress=progress))


def outlier_aware_classifier(train: ImageData, sizes: MNISTSizes, device: str = "cpu",
                             seed: int = 0, progress: bool = True) -> OutlierAwareClassifier:
    """A second view, not the paper's: a CNN taught to answer "no idea" on non-digits (cached)."""
    seed_everything(seed)
    config = {"steps": 600, "seed": seed, "outlier_exposure": 0.5, **_data_tag(train)}
    model = OutlierAwareClassifier(width=16).to(device)
    return load_or_train("mnist_oe_classifier", model, config, lambda m, ckpt: train_classifier(
        m, train.x, train.y, 600, batch_size=128, lr=1e-3, lr_decay_every=None, shift=2,
        outlier_weight=0.5, checkpoint_dir=ckpt, progress=progress))


def cvae_fisher(model: ConditionalVAE, sizes: MNISTSizes, seed: int = 0,
                classes: range | list[int] | None = None, progress: bool = True) -> Fisher:
    """The diagonal Fisher of ``model`` on its own samples of all 10 digits (cached).

    ``classes`` (default all) is what the samples are drawn from -- the official code draws
    every class uniformly (``vae/calculate_fim.py``).
    """
    classes = list(range(model.num_classes) if classes is None else classes)

    def compute() -> Fisher:
        seed_everything(seed)
        return model_fisher(model, classes, sizes.fisher_samples, progress=progress)

    return cached_fisher("mnist_fisher", model, {"samples": sizes.fisher_samples, "seed": seed,
                                                 "classes": classes}, compute, verbose=False)


def forgotten_cvae(original: ConditionalVAE, forget_class: int, fisher: Fisher | None, *,
                   mapping: Any = "noise", lmbda: float, gamma: float, steps: int,
                   batch_size: int, lr: float, naive: bool = False, seed: int = 0,
                   progress: bool = True) -> tuple[ConditionalVAE, dict[str, list[float]]]:
    """A copy of ``original`` after SA (or the paper's naive ablation), with its loss history.

    The result is cached, keyed by the original weights, the Fisher's values, the mapping's
    content and every setting, so rerunning a notebook reloads it in a second and a changed
    Fisher or image set never reuses another run.
    """
    settings = {"forget_class": forget_class, "mapping": mapping_key(mapping), "lmbda": lmbda,
                "gamma": gamma, "steps": steps, "batch_size": batch_size, "lr": lr,
                "naive": naive, "seed": seed,
                "fisher": weights_fingerprint(fisher) if fisher is not None else None}
    key = config_hash({"weights": weights_fingerprint(original), **settings})
    path = cache_dir() / f"mnist_forgotten-{key}.safetensors"
    model = copy.deepcopy(original)
    state = load_cached(path, key)
    if state is not None:
        model.load_state_dict(state)
        return model.eval(), load_tensors(path)[1]["history"]
    seed_everything(seed)
    if naive:   # unbounded: it may run to -inf; then keep its last finite weights
        try:
            history = naive_forget(model, forget_class, fisher=fisher, lmbda=lmbda,
                                   gamma=gamma, steps=steps, batch_size=batch_size, lr=lr,
                                   progress=progress)
        except NonFiniteLossError as diverged:
            history = {**diverged.history, "diverged_at": [len(diverged.history["step"])]}
    else:
        history = forget_one_class(model, forget_class, fisher=fisher, mapping=mapping,
                                   lmbda=lmbda, gamma=gamma, steps=steps,
                                   batch_size=batch_size, lr=lr, progress=progress)
    save_tensors(path, model.state_dict(), {"kind": "weights", "config_hash": key,
                                            "settings": settings, "history": history})
    return model.eval(), history
