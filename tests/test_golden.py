"""Golden answers (lab/golden.py): every stored model carries images and its reference outputs on them; the
service proves each backend against them at load on the machine that serves it, refuses one that computes
another function, and chooses the default rung among those it proved and timed here."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lab import golden as G
from lab.backends import BackendUnavailable, Backend, register_backend
from lab.backends import base as backend_base
from lab.backends.onnx import OnnxBackend
from lab.card import GOLDEN_IMAGES_FILE, GOLDEN_OUTPUTS_FILE, read_card, verify_files
from lab.preprocess import Preprocessing


class Linear:
    """A stand-in model: a fixed linear map of the normalised pixels to 10 outputs."""

    def __init__(self, spec, seed=0, roll=0, noise=0.0):
        n = spec.channels * spec.size[0] * spec.size[1]
        self.w = np.random.default_rng(seed).standard_normal((n, 10)).astype(np.float32) / np.sqrt(n)
        self.roll, self.noise = roll, noise

    def predict(self, batch):
        out = batch.reshape(len(batch), -1) @ self.w
        out = out + self.noise * np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
        return np.roll(out, self.roll, axis=1)


SPEC = Preprocessing(size=(8, 8), channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_a_backend_is_proven_when_it_reproduces_the_reference_and_refused_when_it_computes_another_function():
    images = G.golden_images(np.random.default_rng(0).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8))
    assert images.shape == (G.GOLDEN_IMAGES, 8, 8, 3) and images.dtype == np.uint8
    reference = G.run(Linear(SPEC), images, SPEC)
    exact = G.record(G.run(Linear(SPEC), images, SPEC), reference)
    assert exact["measured"]["agreement"] == 1.0 and exact["tolerance"]["max_mean_diff"] == G.DIFF_FLOOR
    golden = {"reference": "ref", "backends": {"same": exact}}
    assert G.prove(Linear(SPEC), "same", images, reference, SPEC, golden)["measured_here"]["agreement"] == 1.0
    # the same outputs with their classes shifted by one: another function, refused with the reason
    with pytest.raises(G.ProofFailed, match="top-1 agrees with the reference on"):
        G.prove(Linear(SPEC, roll=1), "same", images, reference, SPEC, golden)
    # an approximate backend: its recorded tolerance admits its own noise, not five times more
    noisy = G.record(G.run(Linear(SPEC, noise=0.02), images, SPEC), reference)
    golden["backends"]["noisy"] = noisy
    G.prove(Linear(SPEC, noise=0.02), "noisy", images, reference, SPEC, golden)
    with pytest.raises(G.ProofFailed, match="mean output difference"):
        G.prove(Linear(SPEC, noise=0.1), "noisy", images, reference, SPEC, golden)
    # nothing recorded for a backend: the default tolerance; non-finite outputs never pass
    assert G.prove(Linear(SPEC), "unrecorded", images, reference, SPEC, golden)["tolerance"] == G.DEFAULT_TOLERANCE
    nan = Linear(SPEC)
    nan.predict = lambda b: np.full((len(b), 10), np.nan, np.float32)
    with pytest.raises(G.ProofFailed):
        G.prove(nan, "same", images, reference, SPEC, golden)


def test_every_published_model_carries_golden_answers_and_every_backend_its_tolerance(store):
    card = read_card(store["model_dir"])
    verify_files(store["model_dir"], card, only=[GOLDEN_IMAGES_FILE, GOLDEN_OUTPUTS_FILE])
    images, reference = G.load(store["model_dir"], card)
    assert images.dtype == np.uint8 and images.shape[1:3] == card.preprocessing.size
    assert reference.shape == (len(images), len(card.classes)) and card.golden["reference"] == "onnx"
    # the reference is what the served fp32 graph computes on them, here too
    here = G.run(OnnxBackend(store["model_dir"] / "model.sim.onnx"), images, card.preprocessing)
    assert G.agreement(here, reference).agreement == 1.0
    for name in ("onnx", "onnx_int8", "torch"):
        rec = card.golden["backends"][name]
        assert rec["measured"]["images"] == len(images)
        assert rec["tolerance"]["min_agreement"] <= rec["measured"]["agreement"]


@pytest.fixture
def registered():
    """Register test backends for one test, and take them out of the registry after it."""
    names = []

    def add(cls):
        register_backend(cls)
        names.append(cls.name)
        return cls

    yield add
    for n in names:
        backend_base._REGISTRY.pop(n, None)


def _publish_variant(store, name: str, edit) -> None:
    """Publish the smoke model's files again as `name`, its card changed by edit(card dict)."""
    from lab.card import Card
    from lab.store import publish

    src = store["model_dir"]
    card = read_card(src)
    files = {f: src / f for f in card.files}
    d = card.to_dict()
    edit(d)
    publish(name, files, Card.from_dict(d, require_files=False))


def _catalog(name: str, **settings):
    from serving.catalog import Catalog
    from serving.config import Settings

    return Catalog.from_store(Settings(models=(name,), default_model=name, **settings))


def test_a_backend_whose_golden_record_it_no_longer_matches_is_refused_and_the_others_serve(store):
    def tighten(d):  # the record onnx_int8 would have if its export had computed the fp32 outputs exactly
        d["golden"]["backends"]["onnx_int8"]["tolerance"] = {"min_agreement": 1.0, "max_mean_diff": 1e-9}

    _publish_variant(store, "golden-mismatch", tighten)
    cat = _catalog("golden-mismatch", backends=("onnx", "onnx_int8", "torch"))
    model = cat.latest["golden-mismatch"]
    assert sorted(model.backends) == ["onnx", "torch"]
    why = model.refused["onnx_int8"]
    assert "golden answers not reproduced" in why and "mean output difference" in why
    info = cat.describe()["models"]["golden-mismatch"]
    assert info["refused"]["onnx_int8"] == why and info["proof"]["onnx"]["proven"]
    assert info["proof"]["torch"]["measured_here"]["agreement"] == 1.0


def test_a_runtime_that_computes_another_function_here_is_refused(store, registered):
    @registered
    class ShiftedOnnx(OnnxBackend):  # the served graph, but its answers land one class over
        name, file, serve_by_default = "test_shifted", "model.sim.onnx", False

        def predict(self, batch):
            return np.roll(super().predict(batch), 1, axis=1)

    _publish_variant(store, "golden-shifted", lambda d: None)
    cat = _catalog("golden-shifted", backends=("onnx", "test_shifted"))
    model = cat.latest["golden-shifted"]
    assert list(model.backends) == ["onnx"]
    assert "golden answers not reproduced" in model.refused["test_shifted"]
    assert model.proof["onnx"]["proven"]


def test_golden_files_that_changed_refuse_the_whole_model(store):
    from serving.catalog import Catalog

    _publish_variant(store, "golden-tampered", lambda d: None)
    from lab.store import get_model

    path = get_model("golden-tampered").path / GOLDEN_OUTPUTS_FILE
    path.chmod(0o644)
    arr = np.load(path)
    arr[0] += 1
    np.save(path, arr)
    cat = _catalog("golden-tampered")
    assert "golden-tampered" not in cat.latest
    (tag, why), = [(t, w) for t, w in cat.refused_models.items() if t.startswith("golden-tampered:")]
    assert "golden answers cannot be read" in why and "sha256" in why
    assert isinstance(cat, Catalog)


def test_the_default_rung_is_the_fastest_proven_here_not_the_exporting_machines_best(store, registered):
    @registered
    class AmxOnly(OnnxBackend):  # the exporting machine's best rung, which cannot run on this CPU
        name, file, serve_by_default = "test_amx_only", "model.sim.onnx", False

        @classmethod
        def check_available(cls):
            raise BackendUnavailable("this CPU has no AMX")

    def exported_on_amx(d):
        d["rungs"]["test_amx_only"] = dict(d["rungs"]["onnx"], images_per_s_b64=1e9)
        d["best_rung"] = "test_amx_only"
        d["backends"]["test_amx_only"] = "model.sim.onnx"

    _publish_variant(store, "golden-amx", exported_on_amx)
    cat = _catalog("golden-amx")
    model = cat.latest["golden-amx"]
    choice = model.choice
    assert "test_amx_only" in model.refused and "test_amx_only" not in choice["images_per_s"]
    assert choice["backend"] == max(choice["images_per_s"], key=choice["images_per_s"].get)
    assert model.default_backend() == choice["backend"] and choice["backend"] in model.backends
    assert all(model.proof[b]["proven"] for b in choice["images_per_s"])
    assert choice["exported_best_rung"] == "test_amx_only" and choice["cpu_flags"] is not None
    # every timed rung not asked for (LAB_BACKENDS' default set) nor chosen is let go
    from lab.backends import default_backends

    assert set(model.backends) <= set(default_backends()) | {choice["backend"]}
    # LAB_DEFAULT_BACKEND still decides, and then nothing is timed
    told = _catalog("golden-amx", default_backend="onnx").latest["golden-amx"]
    assert told.default_backend("onnx") == "onnx" and told.choice == {}


def test_a_backend_that_computes_no_model_is_served_unproven_and_says_so(store, registered):
    @registered
    class Zeros(Backend):
        name, file, serve_by_default, computes_model = "test_zeros", "model.sim.onnx", False, False

        def __init__(self, path, card, threads=None):
            self.k = len(card.classes)

        def predict(self, batch):
            return np.zeros((len(batch), self.k), np.float32)

    _publish_variant(store, "golden-zeros", lambda d: None)
    model = _catalog("golden-zeros", backends=("onnx", "test_zeros")).latest["golden-zeros"]
    assert sorted(model.backends) == ["onnx", "test_zeros"]
    assert model.proof["test_zeros"] == {"proven": False, "skipped": "it computes no model by design"}
    assert json.dumps(model.proof)  # what GET /models/ shows is JSON
