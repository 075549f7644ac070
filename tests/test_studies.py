"""The studies (issues 10-12): every stage on smoke, the grid runner's resume and workers, bad input."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time


from tests.conftest import REPO, run_all

STAGE_FILES = {
    "architectures": ["curves_cifar10.png", "curves_mnist.png", "confusion_cifar10.png"],
    "kernels": ["curves.png", "first_layer.png"],
    "depth": ["accuracy_vs_depth.png", "gradient_norms.png", "feature_maps.png"],
    "blocks": ["curves.png"],
    "optimizers": ["curves_cifar10.png"],
    "tuning": ["history.png", "intermediate.png"],
    "scratch": ["numpy_cnn_loss.png", "resnet50_adamax_vs_adam.png"],
}


def test_every_study_stage_runs_on_smoke_and_writes_its_section(smoke_studies, study_data):
    out, lab_env = smoke_studies["out"], smoke_studies["env"]
    report = (out / "report.md").read_text()
    for n, (stage, files) in enumerate(STAGE_FILES.items(), 1):
        section = (out / stage / "section.md").read_text()
        assert f"Command: `python training/run_all.py --preset smoke --only {stage}" in section
        assert "Wall time of this stage" in section
        for f in files:
            assert (out / stage / f).stat().st_size > 1000, (stage, f)
        assert section.splitlines()[0] in report
    assert " ± " in report and "seeds" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= sum(len(f) for f in STAGE_FILES.values()) and "toc" in html
    # every section that compares variants states each difference with its interval and a verdict from it
    for stage in ("architectures", "kernels", "depth", "blocks", "optimizers", "tuning"):
        section = (out / stage / "section.md").read_text()
        assert "95 % CI [" in section and "Holm-adjusted p" in section, stage
        assert "established" in section, stage
    assert "spread" not in report.replace("spread over seeds", "")  # no verdict from seed ranges any more
    _check_raw_results(out, report)
    _check_mnist(out)
    _check_clipping(out)
    _check_optimizers(out)
    assert "sweep seed(s) 100" in report and "chosen LR" in report and "as the cells train" in report
    # smoke's sweeps try two LRs, so none brackets its choice: no verdict on any comparison of a swept variant
    for stage in ("architectures", "kernels", "depth", "blocks", "optimizers"):
        section = (out / stage / "section.md").read_text()
        compared = [line for line in section.splitlines() if "Holm-adjusted p" in line]
        assert "**no** (best at the edge of the grid)" in section and compared, stage
        assert all("**not established (LR not bracketed)**: the best LR of " in line for line in compared), stage
    # the NumPy CNN's weights: load(path).predict(uint8 images) -> (N, 10) logits
    from training.scratch.numpy_cnn import load

    import numpy as np

    model = load(out / "scratch" / "numpy_cnn_seed0" / "numpy_cnn.npz")
    assert model.predict(np.zeros((3, 28, 28), np.uint8)).shape == (3, 10)
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"], env=lab_env,
                            capture_output=True, text=True, check=True).stdout
    assert "cifar10-tuned-cnn-smoke" in listed and "cifar10-custom-cnn-smoke" in listed and "-study-smoke" in listed
    # a rerun finds every cell done and trains nothing again
    again = run_all(["--preset", "smoke", "--data-root", str(study_data), "--only", "kernels"], lab_env, check=True)
    assert "12/12 cells already done" in again.stdout
    # ... and its section still says what the grid cost, not only the seconds of the rerun
    assert "its 12 cells took" in (out / "kernels" / "section.md").read_text()


def _check_raw_results(out, report: str) -> None:
    """Beside the report, its raw results: every cell, every LR swept, every comparison, corrected as one family."""
    import csv
    import json

    from training.studies.family import size

    res = json.loads((out / "results.json").read_text())
    assert res["family_size"] == size("smoke") and "One family of comparisons" in report
    comparisons = [c for stage in res["stages"] for c in stage["comparisons"]]
    # architectures 8, kernels 3, depth 8, blocks 2, optimizers 7 and 14 of stability (+ tuning's)
    assert len(comparisons) >= 42
    for c in comparisons:
        assert c["ci_lo"] <= c["diff"] <= c["ci_hi"] and c["p"] <= c["p_holm"] <= 1
        assert c["df"] > 0 if c["test"] == "t" else c["test"] == "permutation" and c["measure"]
        assert c["family_size"] == res["family_size"] and "family.py" in c["sentence"] and c["sentence"] in report
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["kind"] for r in rows} == {"cell", "variant", "sweep", "comparison"}
    assert sum(r["kind"] == "comparison" for r in rows) == len(comparisons)
    cells = [r for r in rows if r["kind"] == "cell" and r["stage"] == "kernels"]
    assert len(cells) == 12 and all(r["lr"] and r["test_acc"] and r["seed"] for r in cells)
    assert any(r["kind"] == "sweep" and r["chosen"] == "True" for r in rows)
    for stage in ("architectures", "kernels", "depth", "blocks", "optimizers", "tuning"):
        own = json.loads((out / stage / "results.json").read_text())
        assert own["cells"] and (out / stage / "results.csv").stat().st_size > 100, stage


def _check_mnist(out) -> None:
    """CNN vs FC on MNIST as well as on CIFAR-10, the MNIST cells trained on MNIST."""
    import json

    section = (out / "architectures" / "section.md").read_text()
    assert "- cnn − fc: **" in section and "- mnist_cnn − mnist_fc: **" in section and "(MNIST)" in section
    assert "| mnist_cnn |" in section and "| mnist_fc |" in section
    res = json.loads((out / "architectures" / "results.json").read_text())
    cells = [c for c in res["cells"] if c["variant"] in ("mnist_cnn", "mnist_fc")]
    assert len(cells) == 6 and all(c["cell"].startswith("mnist/") for c in cells)
    assert all(c["cell"].startswith("cifar10/") for c in res["cells"] if c not in cells)
    assert {"mnist_cnn", "mnist_fc"} <= set(res["sweeps"])


def _check_clipping(out) -> None:
    """The share of clipped steps beside every variant's accuracy: a column where the stage's cells clip,
    said once where none does; each variant's share in the raw results, summed from its cells' steps."""
    import csv
    import json

    for stage in ("architectures", "kernels", "depth", "blocks"):  # every cell clips at norm 1.0
        section = (out / stage / "section.md").read_text()
        tables = [line for line in section.splitlines() if line.startswith("| ") and "test accuracy" in line]
        assert tables and all("| clipped steps, all seeds |" in line for line in tables), stage
        assert " steps) |" in section and "No cell of this stage clips" not in section, stage
        res = json.loads((out / stage / "results.json").read_text())
        for v, summary in res["variants"].items():
            cells = [c for c in res["cells"] if c["variant"] == v]
            assert summary["grad_clip"] == 1.0 and summary["steps"] == sum(c["steps"] for c in cells) > 0, (stage, v)
            assert summary["clipped_steps"] == sum(c["clipped_steps"] for c in cells) <= summary["steps"]
            assert summary["clipped_share"] == summary["clipped_steps"] / summary["steps"]
    for stage in ("optimizers", "tuning", "scratch"):  # no cell clips: one line, no column of zeros
        section = (out / stage / "section.md").read_text()
        assert section.count("No cell of this stage clips its gradients (grad_clip 0)") == 1, stage
        assert "clipped steps, all seeds" not in section, stage
    rows = [r for r in csv.DictReader((out / "results.csv").open()) if r["kind"] == "variant"]
    assert {r["stage"] for r in rows} >= {"architectures", "optimizers", "tuning"}
    assert all(r["clipped_share"] != "" and 0 <= float(r["clipped_share"]) <= 1 for r in rows)


def _check_optimizers(out) -> None:
    """SGD with and without momentum named; Adam against both; a stability verdict per optimizer against SGD,
    in the report's family; the seeds' claims judged."""
    import json

    from training.studies.optimizers import CLAIMS, STABILITY_COMPARISONS, STABILITY_MEASURES

    section = (out / "optimizers" / "section.md").read_text()
    assert "| sgd | SGD, no momentum |" in section and "| sgd_momentum | SGD, momentum 0.9 (no Nesterov) |" in section
    assert "- adam − sgd: **" in section and "- adam − sgd_momentum: **" in section
    assert "### Stability" in section and "one point per pass" in section
    res = json.loads((out / "optimizers" / "results.json").read_text())
    stable = [c for c in res["comparisons"] if c["measure"]]
    assert {(c["a"], c["b"], c["measure"]) for c in stable} == {
        (a, b, m) for a, b in STABILITY_COMPARISONS for m in STABILITY_MEASURES}
    for c in stable:
        assert c["sentence"] in section and c["family_size"] == res["comparisons"][0]["family_size"]
        verdict = c["sentence"].split("; **")[1].split("**")[0]
        assert verdict in ("more stable", "less stable", "not established",
                           "not established (LR not bracketed)"), verdict
    assert set(res["stability"]) >= {a for a, _ in STABILITY_COMPARISONS} and len(res["stability"]["sgd"]) == 3
    for claim, _, _ in CLAIMS:
        row = next(line for line in section.splitlines() if line.startswith(f"| {claim} |"))
        assert row.split(" | ")[2] in ("**confirmed**", "**contradicted**", "**cannot settle**"), row
    assert res["derived"][0]["text"] in section


def test_unknown_stage_names_the_valid_ones(study_data, lab_env):
    proc = run_all(["--preset", "smoke", "--data-root", str(study_data), "--only", "kernel"], lab_env)
    assert proc.returncode == 2 and "valid stages: train" in proc.stderr and "kernels" in proc.stderr


GRID_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from training.studies.runner import Cell, GridSpec, run_grid
    marks = Path(sys.argv[2])
    def run_cell(cell):
        (marks / f"{cell.variant}-{cell.seed}-{os.getpid()}-{time.time_ns()}").touch()
        time.sleep(float(sys.argv[3]))
        return {"test_acc": cell.seed / 10}
    cells = [Cell("toy", v, s) for v in ("a", "b") for s in (0, 1, 2)]
    if len(sys.argv) > 5:  # a barrier: start only when this many workers are ready
        ready = marks.parent / "ready"
        ready.mkdir(exist_ok=True)
        (ready / str(os.getpid())).touch()
        while len(list(ready.iterdir())) < int(sys.argv[5]):
            time.sleep(0.05)
    done = run_grid(GridSpec("toy", cells, {"k": sys.argv[4]}, run_cell), sys.argv[1], progress=False,
                    log=lambda m: print(m, flush=True))
    print("DONE", len(done), flush=True)
""")


def _grid(tmp_path, storage, marks, sleep="0.3", config="1", env=None):
    script = tmp_path / "grid.py"
    script.write_text(GRID_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), storage, str(marks), sleep, config], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_runner_resumes_after_a_kill_without_redoing_finished_cells(tmp_path, lab_env):
    marks = tmp_path / "marks"
    marks.mkdir()
    storage = f"sqlite:///{tmp_path / 'results.db'}"
    env = dict(lab_env, LAB_STUDY_GRACE_S="3")
    proc = _grid(tmp_path, storage, marks, sleep="1.0", env=env)
    deadline = time.time() + 120
    while len(list(marks.iterdir())) < 4 and time.time() < deadline:  # 3 finished, the 4th running
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started_before = {p.name.rsplit("-", 2)[0] for p in marks.iterdir()}
    again = _grid(tmp_path, storage, marks, sleep="0.1", env=env)
    out, _ = again.communicate(timeout=180)
    assert "DONE 6" in out, out
    assert "3/6 cells already done" in out, out
    starts: dict[str, int] = {}
    for p in marks.iterdir():
        key = p.name.rsplit("-", 2)[0]
        starts[key] = starts.get(key, 0) + 1
    assert len(starts) == 6 and len(started_before) == 4
    # exactly one cell ran twice: the one killed mid-way (its heartbeat stopped, it was queued again)
    assert sorted(starts.values()) == [1, 1, 1, 1, 1, 2], starts


def test_results_of_another_configuration_are_refused_and_kept(tmp_path, lab_env):
    storage = f"sqlite:///{tmp_path / 'results.db'}"
    marks = tmp_path / "m"
    marks.mkdir()
    out, _ = _grid(tmp_path, storage, marks, sleep="0", config="1", env=lab_env).communicate(timeout=120)
    assert "DONE 6" in out
    out, _ = _grid(tmp_path, storage, marks, sleep="0", config="2", env=lab_env).communicate(timeout=120)
    assert "StudyError" in out and "another configuration" in out and "--fresh" in out
    out, _ = _grid(tmp_path, storage, marks, sleep="0", config="1", env=lab_env).communicate(timeout=120)
    assert "6/6 cells already done" in out  # nothing was lost


def test_two_workers_share_one_grid_on_postgresql(tmp_path, lab_env, fresh_postgres_url):
    # An empty database, as on a new machine: both workers create the schema at the same moment
    import optuna

    name = "toy"
    script = tmp_path / "grid.py"
    script.write_text(GRID_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), fresh_postgres_url, str(marks), "0.5", "1", "2"],
                              cwd=REPO, env=lab_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for out in outs:
        assert "DONE 6" in out, out[-4000:]  # the end of the output: a traceback's last lines
    study = optuna.load_study(study_name=name, storage=fresh_postgres_url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len({t.params["cell"] for t in complete}) == 6
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both took cells


def test_a_helper_passes_the_finished_grids_of_its_stage_and_joins_its_own(study_data, lab_env, tmp_path):
    """A helper worker is started for one grid of a stage (an LR sweep's round, the evaluation grid after
    it): it runs the stage from the start, reads back the grids before its own, works on its own and stops."""
    import optuna

    from lab.hardware import cores
    from training.studies.runner import records
    from training.studies.sweep import LRChoice

    storage = f"sqlite:///{tmp_path / 'results.db'}"

    def helper(grid: str):
        subprocess.run([sys.executable, "-m", "training.studies.worker", "depth", "--grid", grid, "--preset", "smoke",
                        "--storage", storage, "--data-root", str(study_data), "--workers", "2",
                        "--out", str(tmp_path / "out")], env=lab_env, check=True, timeout=900, cwd=REPO)

    def grids() -> set[str]:
        return {s.study_name for s in optuna.get_all_study_summaries(storage)}

    helper("depth-lr-sweep-0")  # alone on an empty database: it runs the whole sweep, and nothing after it
    assert grids() == {"depth-lr-sweep-0"}
    sweep = records(optuna.load_study(study_name="depth-lr-sweep-0", storage=storage))
    assert len(sweep) == 12 * 2  # 12 depth variants x the smoke sweep's two LRs
    helper("depth")  # passes the finished sweep, then trains the evaluation grid at the LRs the sweep chose
    evaluation = records(optuna.load_study(study_name="depth", storage=storage))
    assert len(evaluation) == 12 * 3
    choices: dict[str, LRChoice] = {}
    for rec in sweep.values():
        choices.setdefault(rec["variant"], LRChoice(rec["variant"])).add(rec["lr"], rec["seed"], rec["val_acc"],
                                                                          bool(rec.get("diverged")))
    assert all(rec["lr"] == choices[rec["variant"]].chosen for rec in evaluation.values())
    assert {rec["threads"] for rec in evaluation.values()} == {max(1, cores() // 2)}  # torch threads per worker
    assert not (tmp_path / "out" / "depth" / "section.md").exists()  # the report is the stage process's


def test_workers_opening_an_empty_database_at_once_all_get_the_storage(tmp_path, lab_env, fresh_postgres_url):
    # Optuna creates its schema check-then-create; four workers racing on it must all open the storage
    script = tmp_path / "open.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from training.studies.runner import storage_for
        ready = Path(sys.argv[2])
        (ready / str(os.getpid())).touch()
        while len(list(ready.iterdir())) < 4:
            time.sleep(0.01)
        storage_for(sys.argv[1]).engine.dispose()
        print("OPENED", flush=True)
    """))
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), fresh_postgres_url, str(ready)], cwd=REPO, env=lab_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    for out in [p.communicate(timeout=120)[0] for p in procs]:
        assert "OPENED" in out, out[-4000:]


def test_a_zoo_model_exports_and_is_served_by_the_service(study_data, lab_env, tmp_path):
    import requests

    from bench.server import Server
    from tests.test_service import good_image

    run_all(["--preset", "smoke", "--data-root", str(study_data), "--only", "model", "--model", "kernel_cnn",
             "--model-kwargs", '{"kernel": "1x1+3x3"}'], lab_env, check=True)
    with Server(lab_env, tmp_path / "serve.log") as s:
        for backend in ("onnx", "torch"):
            r = requests.post(f"{s.url}/classify", data=good_image(), headers={"Content-Type": "image/png"},
                              params={"model": "cifar10-kernel-cnn-smoke", "backend": backend}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["model"].startswith("cifar10-kernel-cnn-smoke:")


def test_depth_plot_takes_seeds_that_all_give_one_accuracy(tmp_path):
    # three seeds of a net that never learns end on the same accuracy (202 of 2000 test images); their mean
    # is a rounding error above the max, which matplotlib refused as a negative error bar
    from training.studies.architectures import DEPTHS, _depth_plot

    by = {(f"{v}_{d}",): [{"test_acc": 0.101} for _ in range(3)] for v in ("plain", "residual") for d in DEPTHS}
    _depth_plot(by, tmp_path / "depth.png")
    assert (tmp_path / "depth.png").stat().st_size > 0


def test_the_headline_stage_runs_only_when_named(smoke_studies, study_data):
    out, lab_env = smoke_studies["out"], smoke_studies["env"]
    assert not (out / "headline").exists()  # --only studies left it out
    proc = run_all(["--preset", "smoke", "--data-root", str(study_data), "--only", "headline"], lab_env, check=True)
    section = (out / "headline" / "section.md").read_text()
    assert "near convergence" in section and "95 % CI [" in section and "chosen LR" in section
    assert (out / "headline" / "curves.png").stat().st_size > 1000
    assert section.splitlines()[0] in (out / "report.md").read_text() and "-- study headline done" in proc.stdout
