"""Model-level rungs: the teacher cache's key, the distillation loss, the students stage end to end on the
smoke preset (students exported with parity, INT8, in the card's rungs with what they are), and its
refusals (a pruning budget that empties a layer, a teacher cache of another model, a failed parity)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_all


def _tiny_train_set(n=40, seed=0):
    from training.data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])


def _spec():
    from lab.preprocess import Preprocessing

    return Preprocessing(size=(32, 32), channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_distillation_loss_is_cross_entropy_at_weight_0_and_zero_kl_on_its_own_outputs():
    from training.engine import distillation_loss

    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    assert torch.allclose(distillation_loss(out, y, torch.randn(16, 10), weight=0.0, temperature=3.0),
                          F.cross_entropy(out, y))
    assert distillation_loss(out, y, out.clone(), weight=1.0, temperature=2.0).abs() < 1e-6
    teacher = torch.randn(16, 10, generator=g)
    soft = distillation_loss(out, y, teacher, weight=1.0, temperature=2.0)
    p_t = F.softmax(teacher / 2, 1)
    expected = (p_t * (p_t.log() - F.log_softmax(out / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(soft, expected, atol=1e-5)


def test_teacher_outputs_are_cached_by_weights_tta_and_data_and_a_cache_of_another_model_is_refused(tmp_path):
    from models import create_model
    from models.tta import TTA
    from training.compress import teacher as T

    net = create_model("airbench", seed=0, widths=[8, 16, 16]).eval()
    ds, spec = _tiny_train_set(), _spec()
    lines = []
    logits, key = T.teacher_logits(net, "a" * 64, 2, ds, spec, cache_dir=tmp_path, progress=False, log=lines.append)
    with torch.no_grad():
        x = (ds.images.float() / 255 - 0.5) / 0.25
        assert torch.allclose(logits, TTA(net, 2)(x), atol=1e-4)   # the six-view outputs, in the set's order
    assert "cached in" in lines[-1]
    again, key2 = T.teacher_logits(net, "a" * 64, 2, ds, spec, cache_dir=tmp_path, progress=False, log=lines.append)
    assert "from the cache" in lines[-1] and key2 == key and torch.equal(again, logits)
    # another model's weights, another TTA level, other images: other keys, other files
    other = [T.cache_path(T.cache_key("b" * 64, 2, key["data_sha256"]), tmp_path),
             T.cache_path(T.cache_key("a" * 64, 1, key["data_sha256"]), tmp_path),
             T.cache_path(T.cache_key("a" * 64, 2, T.data_digest(_tiny_train_set(seed=1), spec)), tmp_path)]
    assert len({Path(key["file"]), *other}) == 4
    # a cache file of another model put where this teacher's belongs: refused, in one line
    wrong = T.cache_key("b" * 64, 2, key["data_sha256"])
    T.write_cache(Path(key["file"]), wrong, logits.numpy())
    with pytest.raises(T.TeacherCacheError, match="another teacher.*weights_sha256") as e:
        T.teacher_logits(net, "a" * 64, 2, ds, spec, cache_dir=tmp_path, progress=False, log=lines.append)
    assert "\n" not in str(e.value)


def test_a_student_learns_from_the_teachers_outputs_not_only_the_labels():
    """With weight 1 the labels do not enter the loss: a student trained on a teacher that answers a fixed
    permutation of the labels learns the permutation."""
    from dataclasses import replace

    from models import create_model
    from training.engine import TrainConfig, train

    ds, spec = _tiny_train_set(n=64), _spec()
    teacher = F.one_hot((ds.labels + 3) % 10, 10).float() * 8
    cfg = replace(TrainConfig(), epochs=40, batch_size=16, optimizer="adam", lr=3e-3, distill_weight=1.0,
                  distill_temperature=1.0, precision="fp32")
    net = create_model("mlp", seed=0, num_classes=10, in_channels=3, image_size=32)
    res = train(net, ds, spec, cfg, progress=False, log=lambda *_: None, teacher=teacher)
    with torch.no_grad():
        pred = res.model(((ds.images.float() / 255 - 0.5) / 0.25)).argmax(1)
    assert (pred == (ds.labels + 3) % 10).float().mean() > 0.9
    assert all(r["clipped_steps"] == 0 and r["steps"] == 4 for r in res.history)
    with pytest.raises(Exception, match="teacher's logits are for 63 images"):
        train(net, ds, spec, cfg, progress=False, log=lambda *_: None, teacher=teacher[:63])


# ---------------------------------------------------------------- the stage on the smoke preset


def test_the_time_prediction_takes_the_teachers_pass_from_the_measured_evaluation_when_known():
    from training.compress.students import get_students, predict_seconds

    students = get_students(("distilled", "narrow60"))
    args = (students, 100, {"distilled": 100, "narrow60": 40}, 50_000, 10, 400.0, 6)
    guessed = predict_seconds(*args, cached=False)
    measured = predict_seconds(*args, cached=False, teacher_images_per_s=100.0)
    assert guessed["teacher outputs"] == pytest.approx(50_000 * 6 / (3 * 400))
    assert measured["teacher outputs"] == pytest.approx(500.0)       # 50,000 images at 100 images/s
    assert predict_seconds(*args, cached=True, teacher_images_per_s=100.0)["teacher outputs"] == 0
    assert guessed["narrow60"] == measured["narrow60"] < measured["distilled"]


def test_the_smoke_model_is_published_with_its_students_as_rungs(store):
    from lab.backends import get_backend
    from lab.card import read_card, verify_files

    card = read_card(store["model_dir"])
    for student in ("distilled", "finetuned", "pruned"):
        fp32 = f"{student}_1view"
        assert card.backends[fp32] == f"student.{student}.sim.onnx"
        assert get_backend(fp32).file in card.files
        rung = card.rungs[fp32]
        assert rung["network"] == student and rung["views"] == 1
        assert rung["method"] == ("pruning" if student == "pruned" else "distillation")
        assert rung["train_seconds"] > 0 and rung["parameters"] > 0
        assert fp32 in card.golden["backends"]  # proven like every other rung
        # the same graph under OpenVINO at bf16: a rung of the same network, measured where the CPU has
        # native bf16, else listed with the reason it was not
        ov = card.rungs[f"{student}_openvino_bf16_1view"]
        assert card.backends[f"{student}_openvino_bf16_1view"] == f"student.{student}.sim.onnx"
        assert ov["network"] == student and ov["views"] == 1
        assert ov.get("note") or (ov["images_per_s_b64"] > 0 and ov["macs_per_image"] == rung["macs_per_image"])
    assert card.rungs["openvino_bf16_1view"]["views"] == 1
    served = card.rungs["onnx"]
    assert served["network"] == "served" and served["views"] == 6 and served["method"] == "runtime"
    assert card.rungs["onnx_1view"]["macs_per_image"] * 6 == served["macs_per_image"]
    assert card.rungs["distilled_1view"]["macs_per_image"] == card.rungs["onnx_1view"]["macs_per_image"]
    assert card.rungs["pruned_1view"]["macs_per_image"] <= 0.5 * card.rungs["onnx_1view"]["macs_per_image"]
    # quantization-aware training (the smoke preset always runs it): the served network's INT8 rung of its own
    qat = card.rungs["onnx_int8_qat"]
    assert card.backends["onnx_int8_qat"] == "model.qat.int8.onnx" and qat["method"] == "qat"
    assert qat["macs_per_image"] == served["macs_per_image"] and qat["train_seconds"] > 0
    verify_files(store["model_dir"], card)
    records = json.loads((Path(store["run_dir"]) / "students.json").read_text())
    assert set(records) == {"distilled", "finetuned", "pruned"}
    assert records["pruned"]["pruning"]["macs_after"] <= records["pruned"]["pruning"]["macs_before"] // 2


def test_the_finetuned_student_starts_from_the_served_weights(store):
    # the fine-tuned student moves a little from the served network (a few steps at a tenth of the LRs);
    # the distilled one starts where the served network started (the recipe's seed) and trains its own way
    run_dir = Path(store["run_dir"])
    records = json.loads((run_dir / "students.json").read_text())
    assert records["finetuned"]["init"] == "served" and records["finetuned"]["lr_scale"] == 0.1
    assert records["distilled"]["init"] == "scratch"
    served = torch.load(run_dir / "trained.pth", map_location="cpu", weights_only=True)

    def similarity(student: str) -> float:
        weights = torch.load(run_dir / "students" / student / "weights.pth", map_location="cpu", weights_only=True)
        names = [k for k, v in served.items()  # the trained conv filters (the whitening is fitted to the data)
                 if v.dtype.is_floating_point and v.dim() == 4 and not k.startswith("whiten")]
        a = torch.cat([served[k].flatten() for k in names])
        b = torch.cat([weights[k].flatten() for k in names])
        return float(F.cosine_similarity(a, b, dim=0))

    assert similarity("finetuned") > 0.98 > similarity("distilled")


def test_student_graphs_agree_with_their_torch_networks(store):
    from lab.backends import load_backend
    from lab.card import read_card
    from training.compress.students import load_student

    card = read_card(store["model_dir"])
    records = json.loads((Path(store["run_dir"]) / "students.json").read_text())
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    for name, rec in records.items():
        net = load_student(store["run_dir"], rec)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).numpy()
        got = load_backend(f"{name}_1view", store["model_dir"], card).predict(x)
        assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


def test_a_pruning_budget_that_empties_a_layer_is_refused_in_one_line_before_any_student_trains(store, tmp_path):
    import shutil
    from dataclasses import replace

    from training.compress.prune import PruneError
    from training.pipeline import Run
    from training.presets import get_preset

    run_dir = tmp_path / "run"
    shutil.copytree(store["run_dir"], run_dir)
    (run_dir / "students.json").unlink()
    preset = replace(get_preset("smoke"), prune_macs=0.001)
    run = Run(dir=run_dir, preset=preset, data_root=store["data"], progress=False)
    with pytest.raises(PruneError) as e:
        from training.pipeline import stage_students

        stage_students(run)
    assert "\n" not in str(e.value) and "channel" in str(e.value)
    assert not (run_dir / "students.json").exists()


def test_a_student_whose_export_fails_parity_is_not_published_and_the_others_are(store, tmp_path, monkeypatch):
    """The parity check at a tolerance no float graph meets (0): every student's export is refused with its
    reason, and no student file is left to publish."""
    import shutil

    import training.export_hooks as H
    from training.export import export_verified as real
    from training.pipeline import Run, stage_export
    from training.presets import get_preset

    run_dir = tmp_path / "run"
    shutil.copytree(store["run_dir"], run_dir)
    monkeypatch.setattr(H, "export_verified", lambda net, tta, batch, out, **kw: real(net, tta, batch, out, atol=0.0)
                        if tta == 0 and "student" in out.name else real(net, tta, batch, out, **kw))
    run = Run(dir=run_dir, preset=get_preset("smoke"), data_root=store["data"], progress=False)
    stage_export(run)
    record = json.loads((run_dir / "export" / "export.json").read_text())
    students = record["hooks"]["students"]["students"]
    assert all("refused" in r and "disagrees with torch" in r["refused"] for r in students.values())
    assert not [f for f in record["files"] if f.startswith("student.")]
    assert not list((run_dir / "export").glob("student*"))
