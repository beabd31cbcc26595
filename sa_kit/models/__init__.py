"""Model adapters: each implements :class:`sa_kit.objective.ForgettableModel`."""
from sa_kit.models.classifier import Classifier
from sa_kit.models.cvae import ConditionalVAE

__all__ = ["ConditionalVAE", "Classifier"]
