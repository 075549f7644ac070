"""The files of a run folder, typed: who writes them, who reads them, and what is in them.

    runs/<run>/
      config.json      the preset and command line of the run                 (run_all.py)
      trained.json     TrainedRecord: architecture, classes, preprocessing,
                       the training record and per-epoch history              (train stage)
      trained.pth      the trained weights (a plain state_dict)               (train stage)
      metrics.json     EvalRecord: torch fp32 metrics per TTA level           (evaluate stage)
      export/          model.pth, model.onnx, model.sim.onnx, [model.int8.onnx],
      export/export.json  ExportRecord: parity, served accuracy, INT8, files  (export stage)
      published.json   PublishedRecord: the store tag                         (publish stage)

Every write is atomic (a kill mid-write never leaves half a file); a missing file is one clear error
naming the stage that makes it.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any


class MissingArtifact(RuntimeError):
    """A run file that a stage needs is not there (or not readable)."""


def write_json_atomic(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def read_json(path: Path, made_by: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingArtifact(f"{path} is missing: run the {made_by} stage first "
                              f"(or point --run-dir at a run that has it)") from None
    except ValueError as e:
        raise MissingArtifact(f"{path} is not valid JSON ({e}); rerun the {made_by} stage") from None


@dataclass
class TrainedRecord:
    architecture: dict[str, Any]          # {"name": registry name, "kwargs": {...}}
    tta_level: int
    classes: list[str]
    preprocessing: dict[str, Any]         # lab.preprocess.Preprocessing.to_dict()
    dataset: dict[str, Any]               # name, root, image counts, data_seed
    training: dict[str, Any]              # recipe, config, seconds, device, precision, world_size
    history: list[dict[str, Any]] = field(default_factory=list)

    FILE = "trained.json"


@dataclass
class EvalRecord:
    levels: dict[str, dict[str, Any]]     # "tta0", "tta2", ... -> classification metrics

    FILE = "metrics.json"

    def final(self, tta_level: int) -> dict[str, Any]:
        return self.levels[f"tta{tta_level}"]


@dataclass
class ExportRecord:
    parity: dict[str, Any]                # "onnx", "onnx_simplified" -> max |diff|, top-1 agreement
    served: dict[str, Any]                # metrics of model.sim.onnx through the card's preprocessing
    files: list[str]                      # files of export/ to publish (each verified)
    hooks: dict[str, dict] = field(default_factory=dict)  # each export hook's record ("int8": accepted or not)

    FILE = "export/export.json"

    @property
    def int8(self) -> dict[str, Any] | None:
        return self.hooks.get("int8")


@dataclass
class PublishedRecord:
    tag: str

    FILE = "published.json"


class RunFiles:
    """Typed access to one run folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def trained(self) -> TrainedRecord:
        return TrainedRecord(**_fields(read_json(self.path(TrainedRecord.FILE), "train"), TrainedRecord))

    def metrics(self) -> EvalRecord | None:
        p = self.path(EvalRecord.FILE)
        return EvalRecord(read_json(p, "evaluate")) if p.exists() else None

    def export(self) -> ExportRecord:
        return ExportRecord(**_fields(read_json(self.path(ExportRecord.FILE), "export"), ExportRecord))

    def published(self) -> PublishedRecord:
        return PublishedRecord(**read_json(self.path(PublishedRecord.FILE), "publish"))

    def write(self, record) -> Path:
        obj = record.levels if isinstance(record, EvalRecord) else asdict(record)
        return write_json_atomic(self.path(record.FILE), obj)

    def has(self, record_type) -> bool:
        return self.path(record_type.FILE).exists()


def _fields(d: dict, cls) -> dict:
    names = set(cls.__dataclass_fields__)
    missing = [n for n, f in cls.__dataclass_fields__.items()
               if n not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise MissingArtifact(f"{cls.FILE} lacks {', '.join(missing)}: it was written by another version; "
                              f"rerun its stage")
    return {k: v for k, v in d.items() if k in names}
