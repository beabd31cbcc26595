"""Model adapters (each implements :class:`sa_kit.objective.ForgettableModel`), their training
functions, and the evaluation classifiers."""
from sa_kit.models.classifier import (MNISTClassifier, OutlierAwareClassifier, cifar_resnet,
                                      train_classifier)
from sa_kit.models.cvae import ConditionalVAE, train_cvae

__all__ = ["ConditionalVAE", "train_cvae", "MNISTClassifier", "OutlierAwareClassifier",
           "cifar_resnet", "train_classifier"]
