"""Models the lab did not train (training/import_onnx.py): foreign ONNX graphs checked, made servable,
published with golden answers, and served like the lab's own; bad imports refused in one line each."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tests.conftest import REPO
from tests.images import encode

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
IMPORT = [sys.executable, str(REPO / "training" / "import_onnx.py")]


def tiny_graph(k=4, in_shape=(None, 3, 8, 8), n_inputs=1, opset=13, out_4d=False, nodes=1) -> onnx.ModelProto:
    """A small classifier graph: global average pool, then a linear layer to k outputs."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, k)).astype(np.float32), "w")
    inputs = [helper.make_tensor_value_info(f"x{i}" if i else "x", TensorProto.FLOAT, list(in_shape))
              for i in range(n_inputs)]
    graph_nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
                   helper.make_node("Flatten", ["p"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["y0"])]
    for i in range(nodes - 1):
        graph_nodes.append(helper.make_node("Identity", [f"y{i}"], [f"y{i + 1}"]))
    last = f"y{nodes - 1}"
    shape = [in_shape[0], k]
    if out_4d:
        graph_nodes.append(helper.make_node("Unsqueeze", [last, "axes"], ["y4"]))
        last, shape = "y4", [in_shape[0], k, 1, 1]
    inits = [w] + ([numpy_helper.from_array(np.array([2, 3], np.int64), "axes")] if out_4d else [])
    g = helper.make_graph(graph_nodes, "tiny", inputs, [helper.make_tensor_value_info(last, TensorProto.FLOAT, shape)],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def files(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\nc\nd\n")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"size": [8, 8], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}))
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_graph(), str(model))
    return {"classes": classes, "spec": spec, "model": model, "dir": tmp_path}


def _bad(files, tmp_path):
    """name -> (argv changes, the words its one line must hold)."""
    d = tmp_path
    (d / "text.onnx").write_text("this is not a graph")
    onnx.save(tiny_graph(n_inputs=2), str(d / "two.onnx"))
    onnx.save(tiny_graph(in_shape=(None, 3, 8)), str(d / "three_d.onnx"))
    onnx.save(tiny_graph(k=5), str(d / "k5.onnx"))
    ext = tiny_graph()
    onnx.save(ext, str(d / "ext.onnx"), save_as_external_data=True, location="ext.bin", size_threshold=0)
    (d / "ext.bin").unlink()
    new = tiny_graph()
    new.opset_import[0].version = 99
    onnx.save(new, str(d / "new.onnx"))
    blob = files["model"].read_bytes()
    (d / "cut.onnx").write_bytes(blob[: len(blob) // 2])
    onnx.save(tiny_graph(nodes=40), str(d / "big.onnx"))
    (d / "crop.json").write_text(json.dumps({"size": [8, 8], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                                             "resize_size": 6}))
    (d / "dup.txt").write_text("a\nb\na\nd\n")
    (d / "nhwc.json").write_text(json.dumps({"size": [8, 8], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                                             "layout": "NHWC"}))
    onnx.save(tiny_graph(in_shape=(None, 3, 16, 16)), str(d / "size16.onnx"))
    return {
        "not onnx": ({"model": d / "text.onnx"}, "not a readable ONNX model"),
        "two inputs": ({"model": d / "two.onnx"}, "2 inputs"),
        "3-D input": ({"model": d / "three_d.onnx"}, "3-D"),
        "K != classes": ({"model": d / "k5.onnx"}, "has 5 classes, the class file names 4"),
        "missing external data": ({"model": d / "ext.onnx"}, "external data file 'ext.bin'"),
        "opset too new": ({"model": d / "new.onnx"}, "opset 99"),
        "truncated": ({"model": d / "cut.onnx"}, "ONNX"),
        "past the node bound": ({"model": d / "big.onnx", "extra": ["--max-nodes", "20"]}, "more than the bound of 20"),
        "crop larger than resize": ({"spec": d / "crop.json"}, "larger than the resize"),
        "duplicate classes": ({"classes": d / "dup.txt"}, "names some classes twice: a"),
        "layout not the graph's": ({"spec": d / "nhwc.json"}, "the preprocessing makes [N, 8, 8, 3]"),
        "size not the graph's": ({"model": d / "size16.onnx"}, "16"),
        "no such file": ({"model": d / "absent.onnx"}, "no such file"),
    }


def test_bad_imports_are_refused_in_one_line_and_publish_nothing(files, tmp_path, capsys):
    from lab.paths import models_dir
    from lab.store import staging_dir
    from training.import_onnx import main

    cases = _bad(files, tmp_path)
    assert len(cases) >= 10
    for i, (case, (change, words)) in enumerate(cases.items()):
        args = {**files, **change}
        name = f"bad-import-{i}"
        code = main([str(args["model"]), "--name", name, "--classes", str(args["classes"]),
                     "--preprocessing", str(args["spec"]), *args.get("extra", [])])
        err = capsys.readouterr().err.strip()
        assert code == 2, (case, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, (case, err)
        assert not (models_dir() / name).exists(), case
    assert not staging_dir().exists() or not any(staging_dir().iterdir())


def test_the_preprocessing_variants_of_foreign_models_compute_what_they_declare():
    from lab.preprocess import Preprocessing, normalize

    px = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    caffe = Preprocessing(size=(4, 4), channels=3, mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0),
                          layout="NHWC", channel_order="BGR", input_range="0-255")
    want = px[..., ::-1].astype(np.float32) - np.array([104.0, 117.0, 123.0], np.float32)
    assert normalize(px, caffe).shape == (2, 4, 4, 3) and np.allclose(normalize(px, caffe), want)
    torchvision_style = Preprocessing(size=(4, 4), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    want = (px / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(normalize(px, torchvision_style), want.transpose(0, 3, 1, 2), atol=1e-5)
    # the shorter side to resize_size, then the central crop
    from PIL import Image

    from lab.preprocess import resize

    spec = Preprocessing(size=(4, 4), channels=3, mean=(0,) * 3, std=(1,) * 3, resize_size=8)
    img = Image.fromarray(np.arange(16 * 32 * 3, dtype=np.uint8).reshape(16, 32, 3) % 251)
    ref = img.resize((16, 8), Image.Resampling.BILINEAR, reducing_gap=3.0).crop((6, 2, 10, 6))
    assert np.array_equal(np.asarray(resize(img, spec)), np.asarray(ref))


def _import(env, model, name, classes, spec, *extra):
    proc = subprocess.run([*IMPORT, str(model), "--name", name, "--classes", str(classes), "--preprocessing",
                           str(spec), "--golden-images", "32", *extra], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A store with two zoo graphs and a torchvision network exported here, and a service on it."""
    import os

    import torch
    import torchvision

    from bench.server import Server

    root = tmp_path_factory.mktemp("foreign")
    env = dict(os.environ, BENTOML_HOME=str(root / "bentoml"), LAB_CACHE_DIR=str(root / "cache"),
               LAB_RUNS_DIR=str(root / "runs"), BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(REPO))
    imagenet = root / "imagenet.txt"
    imagenet.write_text("\n".join(f"class {i}" for i in range(1000)))
    spec224 = root / "spec224.json"
    spec224.write_text(json.dumps({"size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
                                   "std": [0.229, 0.224, 0.225], "resize_size": 256}))
    tags = {"zoo-squeezenet": _import(env, ZOO / "light_squeezenet.onnx", "zoo-squeezenet", imagenet, spec224,
                                      "--outputs", "probabilities"),
            "zoo-shufflenet": _import(env, ZOO / "light_shufflenet.onnx", "zoo-shufflenet", imagenet, spec224,
                                      "--outputs", "probabilities")}
    # a torchvision network with its own random weights, exported with a fixed batch of 1, taking BGR
    # 0-255 pixels in NHWC: the import frees the batch axis and the card says how to feed it
    net = torchvision.models.mobilenet_v3_small(num_classes=10).eval()

    class Caffe(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x.permute(0, 3, 1, 2).flip(1) / 255.0)

    tv = root / "mobilenet.onnx"
    torch.onnx.export(Caffe(net), (torch.zeros(1, 64, 64, 3),), str(tv), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["logits"])  # the name the import gives its own output
    classes = root / "cifar.txt"
    classes.write_text("\n".join(f"c{i}" for i in range(10)))
    folder = root / "images"
    for i in range(10):
        (folder / f"c{i}").mkdir(parents=True)
        for j in range(2):
            pixels = np.random.default_rng(10 * i + j).integers(0, 256, (70, 80, 3), dtype=np.uint8)
            (folder / f"c{i}" / f"{j}.png").write_bytes(encode(Image.fromarray(pixels), "PNG"))
    spec_tv = root / "spec_tv.json"
    spec_tv.write_text(json.dumps({"size": [64, 64], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1],
                                   "layout": "NHWC", "channel_order": "BGR", "input_range": "0-255",
                                   "resize_size": 72}))
    tags["tv-mobilenet"] = _import(env, tv, "tv-mobilenet", classes, spec_tv, "--accuracy-folder", str(folder))
    server = Server(env, root / "serve.log", {"LAB_DEFAULT_MODEL": "tv-mobilenet", "LAB_MAX_LATENCY_MS": "20000"})
    yield {"env": env, "root": root, "tags": tags, "server": server, "folder": folder}
    server.stop()


def _card(foreign, name):
    return json.loads(next((foreign["root"] / "bentoml" / "models" / name).glob("*/card.json")).read_text())


def test_imported_cards_say_what_was_imported_and_what_was_changed(foreign):
    sq, sh, tv = (_card(foreign, n) for n in ("zoo-squeezenet", "zoo-shufflenet", "tv-mobilenet"))
    assert sq["architecture"]["name"] == "imported" and len(sq["imported"]["sha256"]) == 64
    assert sq["imported"]["opset"] == 9 and "[N, K, 1, 1] output flattened to [N, K]" in sq["imported"]["changes"]
    assert any("log-probabilities" in c for c in sh["imported"]["changes"])
    assert tv["max_batch"] == 0 and "batch axis made free" in tv["imported"]["changes"]
    assert tv["preprocessing"]["layout"] == "NHWC" and tv["preprocessing"]["channel_order"] == "BGR"
    assert tv["metrics"]["test_images"] == 20 and tv["rungs"]["onnx"]["accuracy"] == tv["metrics"]["test_accuracy"]
    for card in (sq, sh, tv):
        assert {"golden.images.npy", "golden.outputs.npy", "model.sim.onnx"} <= set(card["files"])
        assert card["golden"]["backends"]["onnx"]["measured"]["agreement"] == 1.0


def test_imported_models_are_served_and_answer_as_onnx_runtime_does_on_the_same_tensors(foreign):
    from lab.backends.onnx import OnnxBackend
    from lab.preprocess import Preprocessing, decode_uint8, normalize

    server = foreign["server"]
    info = requests.get(f"{server.url}/models/", timeout=30).json()["models"]
    assert {"zoo-squeezenet", "zoo-shufflenet", "tv-mobilenet"} <= set(info)
    for name in ("zoo-squeezenet", "tv-mobilenet"):
        assert all(p["proven"] for b, p in info[name]["proof"].items()), info[name]["proof"]
        card = _card(foreign, name)
        spec = Preprocessing.from_dict(card["preprocessing"])
        model_dir = next((foreign["root"] / "bentoml" / "models" / name).glob("*/card.json")).parent
        direct = OnnxBackend(model_dir / "model.sim.onnx")
        images = sorted(foreign["folder"].glob("*/*.png"))[:8]
        for path in images:
            data = path.read_bytes()
            r = requests.post(f"{server.url}/classify", params={"model": name, "backend": "onnx", "top_k": 1},
                              data=data, headers={"Content-Type": "image/png"}, timeout=60)
            assert r.status_code == 200, r.text
            expected = int(direct.predict(normalize(decode_uint8(data, spec), spec)[None]).argmax(1)[0])
            assert r.json()["predictions"][0]["label"] == card["classes"][expected], (name, path.name)


def test_a_zoo_graph_with_a_reshape_to_batch_one_is_served_one_image_a_call(tmp_path):
    """The zoo's ResNet-50 reshapes to [1, 2048]: the batch axis cannot be freed."""
    from training.import_onnx import make_servable, read_folder  # noqa: F401

    model = onnx.load(str(ZOO / "light_resnet50.onnx"))
    sample = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    servable, max_batch, changes, one = make_servable(model, "probabilities", sample, [str(i) for i in range(1000)],
                                                      log=lambda s: None)
    assert max_batch == 1 and any("batch axis left fixed" in c for c in changes)
    from lab.backends.base import ChunkedBackend
    from lab.backends.onnx import OnnxBackend

    path = tmp_path / "r50.onnx"
    onnx.save(servable, str(path))
    chunked = ChunkedBackend(OnnxBackend(path), 1)
    assert np.allclose(chunked.predict(sample), one, atol=1e-5)
    shutil.rmtree(tmp_path, ignore_errors=True)
