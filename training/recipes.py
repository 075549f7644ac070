"""Recipes: the hyper-parameters of each model family, in one readable place.

A recipe is a dict of TrainConfig fields (training/engine.py), with units. `recipe_for(model)` says
which recipe a registry model trains with; `make_config(recipe, **overrides)` turns one into a
TrainConfig, rescaling the learning rates that grow with the batch size when a preset or the command
line changes the batch (the linear scaling rule: the loss is a mean over the batch, so a step on a
batch twice the size needs twice the LR to move as far per image).

Adding an architecture that needs its own recipe: one entry in RECIPES, one line in MODEL_RECIPES.
"""
from __future__ import annotations

from dataclasses import fields

from training.engine import TrainConfig

RECIPES: dict[str, dict] = {
    # Keller Jordan's airbench94_muon, restated for a mean-reduced loss (airbench sums the loss over the
    # batch, so its SGD learning rates are multiplied by its batch size 2000 here).
    "airbench94_muon": dict(
        epochs=10,                   # passes over the training set
        batch_size=2000,             # images per step
        optimizer="muon",            # Muon for conv filters; Nesterov SGD for biases, head, whitening bias
        lr=0.24,                     # Muon step (its update is orthogonalised and normalised: unitless)
        muon_momentum=0.6,
        momentum=0.85,               # SGD momentum (biases, head)
        nesterov=True,
        bias_lr=0.053 * 2000,        # SGD LR of biases, per mean loss over the batch (scales with batch)
        head_lr=0.67 * 2000,         # SGD LR of the head; the net scales its logits by 1/256
        weight_decay=0.004,          # fraction by which biases and head shrink per step at full LR
        whiten_bias_epochs=3,        # epochs the whitening layer's bias trains, then it is frozen
        whiten_images=5000,          # training images the whitening layer is fitted to
        schedule="linear", warmup=0.0, final_lr=0.0,  # LR decays linearly to 0
        label_smoothing=0.2,
        translate=2,                 # random shift, pixels (reflect padding)
        flip=True,                   # alternating horizontal flip
        tta_level=2,                 # flip + 1-pixel shifts at test time, inside the exported graph
        scale_with_batch=("bias_lr", "head_lr"),
    ),
    # Plain SGD with Nesterov momentum and a one-cycle LR: a sound default for CNNs and ResNets.
    "sgd_onecycle": dict(
        epochs=10,
        batch_size=256,
        optimizer="sgd",
        lr=0.1,                      # peak LR per mean loss over a batch of 256 (scales with batch)
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,           # L2 coefficient
        schedule="onecycle", warmup=0.2, final_lr=0.0,  # 20% warm-up from 0.2x, then linear to 0
        label_smoothing=0.0,
        translate=2,
        flip=True,
        tta_level=0,
        scale_with_batch=("lr",),
    ),
    # The studies' common recipe: one optimizer and schedule for every architecture compared, no
    # augmentation and no weight decay unless a variant is about them (the regularised residual net).
    "study_sgd": dict(
        epochs=4,
        batch_size=128,
        optimizer="sgd",
        lr=0.05,                     # peak LR per mean loss over a batch of 128 (scales with batch)
        momentum=0.9,
        nesterov=True,
        weight_decay=0.0,
        schedule="onecycle", warmup=0.2, final_lr=0.0,
        label_smoothing=0.0,
        translate=0,
        flip=False,
        tta_level=0,
        scale_with_batch=("lr",),
    ),
    # Adam at a constant LR: the seeds' choice for fully connected nets.
    "adam_mlp": dict(
        epochs=10,
        batch_size=128,
        optimizer="adam",
        lr=1e-3,                     # Adam step size (per-parameter normalised: not batch-scaled)
        weight_decay=0.0,
        schedule="cosine", warmup=0.0, final_lr=0.0,
        translate=0,
        flip=False,
        tta_level=0,
        scale_with_batch=(),
    ),
}

MODEL_RECIPES = {"airbench": "airbench94_muon", "mlp": "adam_mlp"}
DEFAULT_RECIPE = "sgd_onecycle"

# Datasets whose mirror image is a different thing (a mirrored "2" is no digit): no flips, in training
# or at test time.
NOT_MIRROR_SAFE = ("mnist",)


class RecipeError(ValueError):
    pass


def recipe_for(model: str) -> str:
    return MODEL_RECIPES.get(model, DEFAULT_RECIPE)


def get_recipe(name: str) -> dict:
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}") from None


def make_config(recipe: str, dataset: str | None = None, **overrides) -> TrainConfig:
    """The TrainConfig of `recipe` with `overrides`; LRs that scale with the batch follow a new batch size
    unless they are overridden themselves. Flips are turned off for datasets that are not mirror-safe."""
    r = dict(get_recipe(recipe))
    scaled = r.pop("scale_with_batch", ())
    valid = {f.name for f in fields(TrainConfig)}
    unknown = sorted(k for k in overrides if k not in valid)
    if unknown:
        raise RecipeError(f"unknown training setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    batch = overrides.get("batch_size", r["batch_size"])
    for key in scaled:
        if key not in overrides:
            r[key] = r[key] * batch / r["batch_size"]
    r.update(overrides)
    if dataset in NOT_MIRROR_SAFE:
        r["flip"] = False
        r["tta_level"] = 0
    return TrainConfig(recipe=recipe, **r)
