"""The model card: the JSON that travels with every stored model, typed and validated on read.

    card = read_card(model_dir)          # a Card, or CardError naming the first thing wrong
    card.classes, card.preprocessing, card.backends["onnx"], card.files["model.sim.onnx"].sha256
    verify_files(model_dir, card, only=["model.sim.onnx"])   # IntegrityError if a byte changed

Training writes it (training/pipeline.py builds a `Card`), the store keeps it as card.json beside the
model files and as the model's metadata, the service reads it before it builds any backend. NumPy-free
and torch-free.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.preprocess import Preprocessing

CARD_FILE = "card.json"
CARD_SCHEMA = 1
GOLDEN_IMAGES_FILE = "golden.images.npy"    # lab/golden.py: uint8 (N, H, W, C), the pixels after the resize
GOLDEN_OUTPUTS_FILE = "golden.outputs.npy"  # float32 (N, K): the reference backend's outputs on them
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class IntegrityError(RuntimeError):
    """A stored model whose files do not match its card: it must not be served."""


class CardError(IntegrityError):
    """A card that is not a valid lab card: one line saying what is wrong."""


@dataclass(frozen=True)
class Architecture:
    name: str                              # a models registry name
    kwargs: dict[str, Any]                 # its keyword arguments (num_classes, in_channels, image_size, ...)


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int


@dataclass
class Card:
    name: str                              # the BentoML model name
    architecture: Architecture
    classes: list[str]                     # label of each output index
    preprocessing: Preprocessing
    tta_level: int                         # test-time augmentation inside every backend (models.tta)
    backends: dict[str, str]               # backend name -> file in the model folder it runs
    metrics: dict[str, Any]                # test_accuracy (as served), per-class accuracy, confusion, ...
    dataset: dict[str, Any]
    training: dict[str, Any]
    parameters: int
    flops_per_image: int                   # one forward pass of one image, without TTA
    parity: dict[str, Any]                 # torch vs each ONNX file on held-out images
    versions: dict[str, str]
    created: str
    files: dict[str, FileRecord] = field(default_factory=dict)  # added when published
    int8: dict[str, Any] | None = None
    rungs: dict[str, Any] | None = None      # backend -> accuracy and speed measured at export (training/ladder.py)
    best_rung: str | None = None             # the fastest rung within the accuracy bound: the default backend
    run_dir: str = ""
    flops_per_image_with_tta: int = 0
    golden: dict[str, Any] | None = None     # golden answers (lab/golden.py): reference, per-backend tolerance
    imported: dict[str, Any] | None = None   # a graph made elsewhere (training/import_onnx.py): its source, sha256,
                                             # what was declared for it and what was changed to serve it
    max_batch: int = 0                       # images per call its graphs take at most (0: any number)
    schema: int = CARD_SCHEMA

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any, *, require_files: bool = True) -> "Card":
        """Validate and type a card dict; CardError names the first problem."""
        if not isinstance(d, dict):
            raise CardError(f"a card is a JSON object, got {type(d).__name__}")
        if d.get("schema") != CARD_SCHEMA:
            raise CardError(f"card schema {d.get('schema')!r}, expected {CARD_SCHEMA}")
        missing = [m for m in _REQUIRED if m not in d]
        if missing:
            raise CardError(f"the card lacks {', '.join(missing)}")
        name = _str(d["name"], "name")
        arch = d["architecture"]
        if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not isinstance(arch.get("kwargs"), dict):
            raise CardError("architecture must be {\"name\": str, \"kwargs\": {...}}")
        classes = d["classes"]
        if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
                or len(set(classes)) != len(classes)):
            raise CardError("classes must be a non-empty list of distinct names")
        k = arch["kwargs"].get("num_classes", len(classes))
        if k != len(classes):
            raise CardError(f"the architecture has {k} outputs but the card names {len(classes)} classes")
        try:
            pre = Preprocessing.from_dict(d["preprocessing"])
        except (KeyError, TypeError, ValueError) as e:
            raise CardError(f"preprocessing is invalid: {type(e).__name__}: {e}") from None
        if d["tta_level"] not in (0, 1, 2):
            raise CardError(f"tta_level must be 0, 1 or 2, got {d['tta_level']!r}")
        backends = d["backends"]
        if not isinstance(backends, dict) or not all(isinstance(a, str) and isinstance(b, str)
                                                     for a, b in backends.items()):
            raise CardError("backends must map backend names to file names")
        files = {}
        for fname, rec in (d.get("files") or {}).items():
            if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and _SHA256.match(rec["sha256"])
                    and isinstance(rec.get("bytes"), int) and rec["bytes"] >= 0):
                raise CardError(f"files[{fname!r}] must be {{\"sha256\": 64 hex digits, \"bytes\": int}}")
            files[fname] = FileRecord(rec["sha256"], rec["bytes"])
        if require_files:
            if not files:
                raise CardError("the card lists no files (and their sha256)")
            unlisted = sorted(f for f in backends.values() if f not in files)
            if unlisted:
                raise CardError(f"backend file(s) {', '.join(unlisted)} have no sha256 in the card")
        for key in ("parameters", "flops_per_image"):
            if not isinstance(d[key], int) or d[key] < 0:
                raise CardError(f"{key} must be a non-negative integer")
        metrics = d["metrics"]
        if not isinstance(metrics, dict):
            raise CardError("metrics must be an object")
        rungs, best = d.get("rungs"), d.get("best_rung")
        if rungs is not None and not isinstance(rungs, dict):
            raise CardError("rungs must be an object")
        if best is not None and best not in backends:
            raise CardError(f"best_rung {best!r} is not one of the card's backends")
        golden = d.get("golden")
        if golden is not None:
            _check_golden(golden, files if require_files else None)
        return cls(
            name=name, architecture=Architecture(arch["name"], dict(arch["kwargs"])), classes=list(classes),
            preprocessing=pre, tta_level=int(d["tta_level"]), backends=dict(backends), metrics=metrics,
            dataset=dict(d.get("dataset") or {}), training=dict(d.get("training") or {}),
            parameters=d["parameters"], flops_per_image=d["flops_per_image"], parity=dict(d.get("parity") or {}),
            versions=dict(d.get("versions") or {}), created=str(d.get("created", "")), files=files,
            int8=d.get("int8"), rungs=rungs, best_rung=best, run_dir=str(d.get("run_dir", "")),
            flops_per_image_with_tta=int(d.get("flops_per_image_with_tta", 0)), golden=golden,
            imported=d.get("imported"), max_batch=_max_batch(d.get("max_batch", 0)))

    def public_dict(self) -> dict:
        """The card without this machine's paths (what GET /models/ shows)."""
        d = self.to_dict()
        d.pop("run_dir", None)
        d.get("dataset", {}).pop("root", None)
        return d


_REQUIRED = ("name", "architecture", "classes", "preprocessing", "tta_level", "backends", "metrics",
             "parameters", "flops_per_image")


def _check_golden(golden: Any, files: dict | None) -> None:
    if not isinstance(golden, dict) or not isinstance(golden.get("backends"), dict):
        raise CardError("golden must be {\"reference\": str, \"backends\": {name: record}, ...}")
    for name, rec in golden["backends"].items():
        tol = rec.get("tolerance") if isinstance(rec, dict) else None
        if not (isinstance(tol, dict) and all(isinstance(tol.get(k), (int, float))
                                              for k in ("min_agreement", "max_mean_diff"))):
            raise CardError(f"golden.backends[{name!r}] needs a tolerance with min_agreement and max_mean_diff")
    missing = [f for f in (GOLDEN_IMAGES_FILE, GOLDEN_OUTPUTS_FILE) if files is not None and f not in files]
    if missing:
        raise CardError(f"the card has golden answers but no sha256 for {', '.join(missing)}")


def _max_batch(v: Any) -> int:
    if not isinstance(v, int) or v < 0:
        raise CardError(f"max_batch must be a non-negative integer, got {v!r}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise CardError(f"{what} must be a non-empty string")
    return v


def read_card(model_dir: Path | str) -> Card:
    path = Path(model_dir) / CARD_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CardError(f"{path}: unreadable model card ({e})") from None
    try:
        return Card.from_dict(raw)
    except CardError as e:
        raise CardError(f"{path}: {e}") from None


def write_card(model_dir: Path | str, card: Card) -> Path:
    path = Path(model_dir) / CARD_FILE
    path.write_text(json.dumps(card.to_dict(), indent=1))
    return path


# ---------------------------------------------------------------- the files a card vouches for


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> FileRecord:
    return FileRecord(sha256_file(path), path.stat().st_size)


def inside(model_dir: Path | str, name: str) -> Path:
    """model_dir/name, refusing names that lead outside the folder (../.., absolute paths)."""
    root = Path(model_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise IntegrityError(f"the card names a file outside the model folder: {name!r}")
    return path


def verify_files(model_dir: Path | str, card: Card, only: list[str] | None = None) -> None:
    """Every file the card lists (or those in `only`, which the card must list) exists inside
    model_dir with the card's sha256."""
    names = list(card.files) if only is None else only
    if not names:
        raise IntegrityError("the card lists no files to check")
    for name in names:
        rec = card.files.get(name)
        if rec is None:
            raise IntegrityError(f"the card has no sha256 for {name!r}")
        path = inside(model_dir, name)
        if not path.is_file():
            raise IntegrityError(f"{name} is missing from the model folder")
        digest = sha256_file(path)
        if digest != rec.sha256:
            raise IntegrityError(f"{name} has sha256 {digest[:12]}..., the card says {rec.sha256[:12]}...: "
                                 f"refusing it")
