"""What every registry model is: an `ImageClassifier` that declares its roles instead of having them guessed.

    class MyNet(ImageClassifier):
        def __init__(self, num_classes=10, in_channels=3, image_size=32):
            super().__init__()
            self.features = nn.Sequential(...)      # image -> feature vector
            self.head = nn.Linear(width, num_classes)

Roles the training side asks for (timm's `get_classifier()` idea):
  get_classifier()   the final linear layer (recipes give it its own learning rate)
  fit_to_data(x)     data-dependent initialisation before training (airbench's whitening); default none
  param_roles()      named parameter groups beyond "head" (e.g. {"whitening_bias": [...]}), for recipes
                     that schedule them on their own
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ImageClassifier(nn.Module):
    """Base of every registry model: `features` then `head`, unless `forward` says otherwise."""

    features: nn.Module
    head: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def fit_to_data(self, images: torch.Tensor) -> bool:
        """Initialise data-dependent layers from normalised training images (N, C, H, W).

        Returns True when the model has such layers (and fitted them), False when it has none."""
        del images
        return False

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role. "head" is always there; models add their own roles."""
        return {"head": [p for p in self.get_classifier().parameters() if p.requires_grad]}


def flat_features(module: nn.Module, in_channels: int, image_size: int) -> int:
    """The length of `module`'s flattened output for one (in_channels, image_size, image_size) image."""
    with torch.no_grad():
        was_training = module.training
        module.eval()
        n = module(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1]
        module.train(was_training)
    return n
