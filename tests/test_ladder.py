"""The optimization ladder (training/ladder.py, bench/ladder.py, the export's `ladder` hook): the paired
interval and its verdict on known inputs, the best-rung rule, the page on the smoke model, and the
service answering with the card's best rung by default."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import requests

from lab.card import read_card
from tests.conftest import REPO
from training.ladder import Rung, best_rung, paired_diff, verdict


def test_the_paired_interval_on_known_inputs():
    same = np.array([1, 0, 1, 1, 0] * 200, bool)
    assert paired_diff(same, same) == (0.0, (0.0, 0.0))
    assert verdict(*paired_diff(same, same)) == "not established"
    better = same.copy()
    better[np.flatnonzero(~same)[:300]] = True  # 300 of 1000 images newly right, none lost
    diff, (lo, hi) = paired_diff(better, same)
    assert diff == pytest.approx(0.3) and 0.27 < lo < 0.3 < hi < 0.33 and verdict(diff, (lo, hi)) == "better"
    assert verdict(*paired_diff(same, better)) == "worse"
    swapped = same.copy()  # 10 right turned wrong, 10 wrong turned right: no difference established
    swapped[np.flatnonzero(same)[:10]] = False
    swapped[np.flatnonzero(~same)[:10]] = True
    diff, ci = paired_diff(swapped, same)
    assert diff == 0 and ci[0] < 0 < ci[1] and verdict(diff, ci) == "not established"


def test_the_best_rung_is_the_fastest_within_the_bound():
    rungs = {"onnx": Rung("onnx", accuracy=0.910, images_per_s_b64=260),
             "fast_but_worse": Rung("fast_but_worse", accuracy=0.900, images_per_s_b64=2000),
             "int8": Rung("int8", accuracy=0.906, images_per_s_b64=700),
             "slow": Rung("slow", accuracy=0.912, images_per_s_b64=180),
             "broken": Rung("broken", note="BackendUnavailable: not here")}
    assert best_rung(rungs, "onnx", 0.005)[0] == "int8"
    assert best_rung(rungs, "onnx", 0.02)[0] == "fast_but_worse"
    assert best_rung(rungs, "onnx", 0.0)[0] == "onnx"


def test_the_export_measures_every_published_rung_into_the_card(store):
    card = read_card(store["model_dir"])
    assert card.rungs and card.best_rung in card.backends and card.best_rung in card.rungs
    for name, rung in card.rungs.items():
        if not rung["note"]:
            assert 0 <= rung["accuracy"] <= 1 and rung["images_per_s_b64"] > 0 and rung["ms_b1_p50"] > 0, name
    assert card.rungs["onnx"]["diff"] == 0 and card.rungs["onnx"]["top1_changes"] == 0
    assert {"onnx", "onnx_int8", "onnx_1view", "torch"} <= set(card.rungs)


def test_the_ladder_page_for_a_stored_model(store, tmp_path):
    out = tmp_path / "ladder"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ladder.py"), "--model", "cifar10-airbench-smoke",
                           "--limit", "64", "--rounds", "1", "--backends", "onnx,onnx_int8,onnx_1view,torch,nope_x",
                           "--out", str(out)], env=dict(store["env"], LAB_DATA_ROOT=str(store["data"])),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "backends must be among" in proc.stderr  # an unknown rung: one line
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ladder.py"), "--model", "cifar10-airbench-smoke",
                           "--limit", "64", "--rounds", "1",
                           "--backends", "onnx_int8,onnx_1view,torch,torch_compile,distilled_1view,pruned_int8_1view",
                           "--out", str(out)], env=dict(store["env"], LAB_DATA_ROOT=str(store["data"])),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "ladder.json").read_text())
    assert report["images"] == 64 and {"onnx", "onnx_int8", "onnx_1view", "torch"} <= set(report["rungs"])
    assert report["best"] in report["rungs"] and report["cpu_flags"]
    md = (out / "ladder.md").read_text()
    assert "| `onnx_int8`" in md and "95 % CI" in md and "ladder.png" in md
    # model-level rungs beside the runtime ones, each saying what it is; the gain they add is stated
    assert report["rungs"]["distilled_1view"]["network"] == "distilled"
    assert report["rungs"]["pruned_int8_1view"]["method"] == "pruning"
    assert report["rungs"]["onnx_1view"]["views"] == 1 and report["rungs"]["onnx"]["views"] == 6
    assert "| distilled / distillation / 1 |" in md and "M MACs per image" in md
    if report["model_level"]:
        assert f"`{report['model_level']['best']}`, runs" in md
    assert (out / "ladder.png").stat().st_size > 0 and "data:image/png;base64" in (out / "ladder.html").read_text()


def test_the_ladder_page_from_the_card_measures_nothing_and_shows_every_stored_rung(store, tmp_path):
    """--from-card: the page from the rungs the export measured (the card's), the same rungs and figures."""
    from lab.card import read_card

    out = tmp_path / "ladder-card"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ladder.py"), "--model", "cifar10-airbench-smoke",
                           "--from-card", "--out", str(out)], env=dict(store["env"], LAB_DATA_ROOT="/nonexistent"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    card = read_card(store["model_dir"])
    report = json.loads((out / "ladder.json").read_text())
    assert set(report["rungs"]) == set(card.rungs) and report["best"] == card.best_rung
    for name, rung in card.rungs.items():
        assert report["rungs"][name]["images_per_s_b64"] == rung["images_per_s_b64"], name
    assert report["images"] == card.dataset["test_images"] and report["cpu_flags"]
    md = (out / "ladder.md").read_text()
    assert "--from-card" in md and "measured at export" in md and "| `onnx_int8`" in md
    assert (out / "ladder.png").stat().st_size > 0


def test_a_rung_without_its_file_is_skipped_with_the_reason(store, tmp_path):
    """A copy of the smoke model published without its one-view INT8 file: that rung is listed as absent."""
    import shutil

    home = tmp_path / "bentoml"
    name = "cifar10-airbench-smoke"
    copy = home / "models" / name / store["model_dir"].name
    shutil.copytree(store["model_dir"], copy)
    (home / "models" / name / "latest").write_text(copy.name)
    card = json.loads((copy / "card.json").read_text())
    gone = "model.1view.int8.onnx"
    assert gone in card["files"]
    (copy / gone).unlink()
    card["files"].pop(gone)
    card["backends"] = {b: f for b, f in card["backends"].items() if f != gone}
    card["best_rung"] = "onnx"
    (copy / "card.json").write_text(json.dumps(card))
    out = tmp_path / "ladder"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "ladder.py"), "--model", name, "--limit", "32",
                           "--rounds", "1", "--backends", "onnx,onnx_int8_1view", "--out", str(out)],
                          env=dict(store["env"], BENTOML_HOME=str(home), LAB_DATA_ROOT=str(store["data"])),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "ladder.json").read_text())
    assert report["absent"] == {"onnx_int8_1view": f"the model has no {gone}"} and list(report["rungs"]) == ["onnx"]
    assert f"`onnx_int8_1view`: the model has no {gone}" in (out / "ladder.md").read_text()


def test_the_service_answers_with_the_rung_it_proved_and_timed_fastest_unless_told(server, store):
    card = read_card(store["model_dir"])
    info = requests.get(f"{server.url}/models/", timeout=10).json()["models"]["cifar10-airbench-smoke"]
    choice = info["default_choice"]
    assert info["default_backend"] == choice["backend"] and info["rungs"] == card.rungs
    assert choice["backend"] == max(choice["images_per_s"], key=choice["images_per_s"].get)
    assert all(info["proof"][b]["proven"] for b in choice["images_per_s"])  # every timed rung was proven first
    assert "timed at load" in info["default_reason"]
    from tests.test_service import good_image

    r = requests.post(f"{server.url}/classify", data=good_image(), headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200 and r.json()["backend"] == choice["backend"], r.text
    r = requests.post(f"{server.url}/classify", data=good_image(), params={"backend": "onnx"},
                      headers={"Content-Type": "image/png"}, timeout=30)
    assert r.json()["backend"] == "onnx"
