"""Presets of run_all.py: which data, which model, which recipe. Hyper-parameters live here.

  smoke  seconds; tiny slices of the data and a narrow net (the tests run it end to end)
  quick  the default: real CIFAR-10 on a 2-core CPU, the served model, about 12 minutes of training
  full   for a GPU: the same recipe trained longer
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from training.engine import TrainConfig

# airbench94_muon's recipe (Keller Jordan), restated for a mean-reduced loss: airbench sums the loss
# over the batch, so its SGD learning rates are multiplied by the batch size here (0.053 * 2000 = 106,
# 0.67 * 2000 = 1340); Muon normalises its update and is unaffected. `weight_decay` of the muon recipe
# is the fraction by which biases and head shrink per step (airbench's 2e-6 * batch size).
MUON_RECIPE = TrainConfig(
    epochs=10, batch_size=2000, optimizer="muon", lr=0.24, muon_momentum=0.6, momentum=0.85,
    bias_lr=106.0, head_lr=1340.0, weight_decay=0.004, whiten_bias_epochs=3,
    schedule="linear", warmup=0.0, final_lr=0.0, label_smoothing=0.2,
    translate=2, flip=True, tta_level=2)


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    model: str
    model_kwargs: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    val_size: int | float = 0        # held out of the training split, reproducibly from the seed
    train_limit: int = 0             # 0 = all training images (after the split)
    test_limit: int = 0              # 0 = the whole test split
    image_size: int = 32             # for image-folder data
    store_name: str = ""             # BentoML model name; "" = <dataset>-<model>
    parity_images: int = 256         # held-out test images for the export parity check
    calibration_images: int = 512    # training images that calibrate the INT8 model (0 = no INT8)
    int8_max_drop: float = 0.01      # an INT8 model losing more test accuracy is not published
    description: str = ""

    @property
    def model_name_in_store(self) -> str:
        return self.store_name or f"{self.dataset.replace('_', '-')}-{self.model.replace('_', '-')}"


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke", dataset="cifar10", model="airbench", model_kwargs={"widths": [16, 32, 32]},
        train=replace(MUON_RECIPE, epochs=2, batch_size=64, bias_lr=0.053 * 64, head_lr=0.67 * 64,
                      whiten_images=256, whiten_bias_epochs=1),
        val_size=64, train_limit=512, test_limit=256, parity_images=32, calibration_images=64,
        int8_max_drop=1.0,  # a net this small is near chance: publish its INT8 model whatever it scores
        store_name="cifar10-airbench-smoke",
        description="seconds: 512 training images, a narrow net, 2 epochs"),
    "quick": Preset(
        name="quick", dataset="cifar10", model="airbench", train=MUON_RECIPE,
        store_name="cifar10-airbench",
        description="real CIFAR-10 on this CPU: airbench94_muon's recipe, 10 epochs, flip+translate TTA"),
    "full": Preset(
        name="full", dataset="cifar10", model="airbench", train=replace(MUON_RECIPE, epochs=20),
        store_name="cifar10-airbench",
        description="for a GPU: the quick recipe for 20 epochs"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
