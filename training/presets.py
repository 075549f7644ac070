"""Presets of run_all.py: which data, which model, which recipe, how much of it.

  smoke  seconds; tiny slices of the data and a narrow net (the tests run it end to end)
  quick  the default: real CIFAR-10 on a 2-core CPU, the served model, about 12 minutes of training
  full   for a GPU: the same recipe trained longer

A preset names its recipe only to depart from the model's own (training/recipes.py); `overrides` are
TrainConfig fields on top of the recipe. Overriding the model on the command line switches to that
model's recipe and store name, unless --recipe / --store-name say otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from training.engine import TrainConfig
from training.recipes import make_config, recipe_for

# INT8 recipe grids (training/quantize.py): MinMax, Entropy and Percentile calibration x per-channel and
# per-tensor weights with u8 activations, plus s8 activations for the default. Entropy and Percentile keep
# every calibrated tensor in memory before building histograms (the served model: about 7 MB and 0.1 s per
# image on 2 cores, against 0.03 s for MinMax), so on a CPU they calibrate on 256 images.
_INT8_GRID = ("minmax/per-channel/u8/512", "minmax/per-tensor/u8/512", "minmax/per-channel/s8/512",
              "entropy/per-channel/u8/{n}", "entropy/per-tensor/u8/{n}",
              "percentile/per-channel/u8/{n}", "percentile/per-tensor/u8/{n}")


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    model: str
    model_kwargs: dict = field(default_factory=dict)
    recipe: str = ""                 # "" = the model's recipe (recipes.recipe_for)
    overrides: dict = field(default_factory=dict)  # TrainConfig fields on top of the recipe
    data_seed: int = 0               # the validation split and test subset (the training seed is separate)
    val_size: int | float = 0        # held out of the training split
    train_limit: int = 0             # 0 = all training images (after the split)
    test_limit: int = 0              # 0 = the whole test split
    image_size: int = 32             # for image-folder data
    store_name: str = ""             # BentoML model name; "" = <dataset>-<model><store_suffix>
    store_suffix: str = ""
    parity_images: int = 256         # held-out test images for the export parity check
    calibration_images: int = 512    # training images that calibrate the INT8 model (0 = no INT8)
    int8_max_drop: float = 0.01      # an INT8 model losing more test accuracy is not published
    # INT8 recipes (training/quantize.py names) tried by the export; the one that agrees best with fp32 on
    # held-out training images is chosen. () = the default recipe on `calibration_images` images
    int8_recipes: tuple[str, ...] = ()
    ladder_skip: tuple[str, ...] = ()  # rungs the export's ladder does not measure (training/ladder.py)
    # students the students stage trains (training/compress/students.py): cheaper networks as rungs
    students: tuple[str, ...] = ("distilled", "finetuned", "narrow80", "narrow60", "pruned")
    prune_macs: float = 0.5          # the pruned student's MAC budget, a share of the served network's one view
    # quantization-aware training (export hook `qat`): when post-training INT8 loses more than this accuracy
    # on held-out training images (never the test set); epochs of its fine-tune
    qat_above_drop: float = 0.003
    qat_epochs: float = 1.0
    description: str = ""

    def __post_init__(self):
        from training.quantize import Recipe

        for name in self.int8_recipes:
            Recipe.parse(name)  # a bad name fails here, before any work, in one line
        from training.compress.students import get_students

        get_students(self.students)

    @property
    def recipe_name(self) -> str:
        return self.recipe or recipe_for(self.model)

    def config(self) -> TrainConfig:
        return make_config(self.recipe_name, dataset=self.dataset, **self.overrides)

    @property
    def model_name_in_store(self) -> str:
        return self.store_name or (f"{self.dataset.replace('_', '-')}-{self.model.replace('_', '-')}"
                                   f"{self.store_suffix}")


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke", dataset="cifar10", model="airbench", model_kwargs={"widths": [16, 32, 32]},
        overrides=dict(epochs=2, batch_size=64, whiten_images=256, whiten_bias_epochs=1),
        val_size=64, train_limit=512, test_limit=256, parity_images=32, calibration_images=64,
        int8_max_drop=1.0,  # a net this small is near chance: publish its INT8 model whatever it scores
        int8_recipes=("minmax/per-channel/u8/64", "minmax/per-tensor/u8/64"),
        ladder_skip=("torch_compile",),  # compiling costs more than the whole smoke run
        store_suffix="-smoke", students=("distilled", "finetuned", "pruned"),
        qat_above_drop=-1.0,  # always, so the tests reach it
        description="seconds: 512 training images, a narrow net, 2 epochs"),
    "quick": Preset(
        name="quick", dataset="cifar10", model="airbench",
        int8_recipes=tuple(r.format(n=256) for r in _INT8_GRID),
        description="real CIFAR-10 on this CPU: airbench94_muon's recipe, 10 epochs, flip+translate TTA"),
    "full": Preset(
        name="full", dataset="cifar10", model="airbench", overrides=dict(epochs=20),
        int8_recipes=tuple(r.format(n=512) for r in _INT8_GRID),
        description="for a GPU: the quick recipe for 20 epochs"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
