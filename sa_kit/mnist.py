"""Chapter 1's building blocks: the data, the trained cVAE, its classifier and its Fisher.

Each step is cached (safetensors, keyed by a hash of its config), so the demo, the notebook
and the explorer widget share one trained model and one Fisher, and a rerun takes seconds.
Each step seeds itself, so cached and fresh runs give the same numbers downstream.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from sa_kit import seed_everything
from sa_kit.data import ImageData, load_mnist
from sa_kit.fisher import Fisher, check_fisher, model_fisher
from sa_kit.io import cache_dir, config_hash, load_cached, save_tensors
from sa_kit.models.classifier import Classifier, train_classifier
from sa_kit.models.cvae import ConditionalVAE, train_cvae
from sa_kit.profiles import MNISTSizes


def mnist_splits(seed: int = 0, verbose: bool = True) -> tuple[ImageData, ImageData]:
    """MNIST shuffled (seeded) and split 90/10 into train and test."""
    return load_mnist(verbose=verbose).split(test_fraction=0.1, seed=seed)


def _data_tag(data: ImageData) -> dict[str, Any]:
    return {"source": data.source, "n": len(data)}


def pretrained_cvae(train: ImageData, sizes: MNISTSizes, device: str = "cpu", seed: int = 0,
                    progress: bool = True) -> ConditionalVAE:
    """The original model theta*: a cVAE trained on ``train`` (loaded from cache if made)."""
    from sa_kit.io import load_or_train

    seed_everything(seed)
    config = {"steps": sizes.vae_steps, "seed": seed, **_data_tag(train)}
    model = ConditionalVAE().to(device)
    return load_or_train("mnist_cvae", model, config, lambda m: train_cvae(
        m, train.x, train.y, sizes.vae_steps, progress=progress))


def pretrained_classifier(train: ImageData, sizes: MNISTSizes, device: str = "cpu",
                          seed: int = 0, progress: bool = True) -> Classifier:
    """The evaluation classifier, trained on real digits (loaded from cache if made)."""
    from sa_kit.io import load_or_train

    seed_everything(seed)
    config = {"steps": sizes.classifier_steps, "seed": seed, **_data_tag(train)}
    model = Classifier(width=16).to(device)
    return load_or_train("mnist_classifier", model, config, lambda m: train_classifier(
        m, train.x, train.y, sizes.classifier_steps, progress=progress))


def cvae_fisher(model: ConditionalVAE, sizes: MNISTSizes, seed: int = 0,
                progress: bool = True) -> Fisher:
    """The diagonal Fisher of ``model`` on its own samples of all 10 digits (cached)."""
    weights = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    key = config_hash({"weights": weights, "samples": sizes.fisher_samples, "seed": seed})
    path = cache_dir() / f"mnist_fisher-{key}.safetensors"
    fisher = load_cached(path, key)
    if fisher is None:
        seed_everything(seed)
        fisher = model_fisher(model, range(model.num_classes), sizes.fisher_samples,
                              progress=progress)
        save_tensors(path, fisher, {"kind": "fisher", "config_hash": key,
                                    "model": type(model).__name__, "sizes": asdict(sizes)})
    device = next(model.parameters()).device
    fisher = {k: v.to(device) for k, v in fisher.items()}
    check_fisher(fisher, model)
    return fisher


def forgotten_cvae(original: ConditionalVAE, forget_class: int, fisher: Fisher | None, *,
                   mapping: Any = "noise", lmbda: float, gamma: float, steps: int,
                   batch_size: int, lr: float, naive: bool = False, seed: int = 0,
                   progress: bool = True) -> tuple[ConditionalVAE, dict[str, list[float]]]:
    """A copy of ``original`` after SA (or the naive ablation), with its loss history.

    The result is cached, keyed by the original weights and every setting, so rerunning a
    notebook reloads it in a second instead of training again.
    """
    import copy

    from sa_kit.forget import forget_class as sa_forget_class
    from sa_kit.forget import NonFiniteLossError, naive_forget
    from sa_kit.io import load_tensors

    settings = {"forget_class": forget_class, "mapping": str(mapping), "lmbda": lmbda,
                "gamma": gamma, "steps": steps, "batch_size": batch_size, "lr": lr,
                "naive": naive, "seed": seed}
    weights = {k: float(v.double().sum()) for k, v in original.state_dict().items()}
    key = config_hash({"weights": weights, **settings})
    path = cache_dir() / f"mnist_forgotten-{key}.safetensors"
    model = copy.deepcopy(original)
    state = load_cached(path, key)
    if state is not None:
        model.load_state_dict(state)
        return model.eval(), load_tensors(path)[1]["history"]
    seed_everything(seed)
    if naive:   # unbounded: it may run to -inf; then keep its last finite weights
        try:
            history = naive_forget(model, forget_class, steps=steps, batch_size=batch_size,
                                   lr=lr, progress=progress)
        except NonFiniteLossError as diverged:
            history = {**diverged.history, "diverged_at": [len(diverged.history["step"])]}
    else:
        history = sa_forget_class(model, forget_class, fisher=fisher, mapping=mapping,
                                  lmbda=lmbda, gamma=gamma, steps=steps, batch_size=batch_size,
                                  lr=lr, progress=progress)
    save_tensors(path, model.state_dict(), {"kind": "weights", "config_hash": key,
                                            "settings": settings, "history": history})
    return model.eval(), history
