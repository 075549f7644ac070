"""Quantization-aware training (training/compress/qat.py): the export's custom QuantizeLinear/DequantizeLinear
op still exports with a dynamic batch (the torch-version workaround), prepare + finetune + export_qdq on a
small trained CNN (a QDQ graph with int8 weights that the onnx_int8 backend runs as QLinearConv/QGemm and that
agrees with the fake-quant torch net), custom_cnn's standardised filters with TTA, and the one-line refusals."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from training.compress import qat as Q


def _spec():
    from lab.preprocess import Preprocessing

    return Preprocessing(size=(32, 32), channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _fake_set(n: int, seed: int = 0):
    """n 32x32 images whose class is learnable (tests/fakedata.py's per-class patterns)."""
    from tests.fakedata import _class_images
    from training.data import ArrayDataset

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = torch.from_numpy(np.ascontiguousarray(_class_images(rng, labels, 32, 3).transpose(0, 3, 1, 2)))
    return ArrayDataset(images, torch.from_numpy(labels), [str(i) for i in range(10)])


def _ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """simple_cnn trained for 2 epochs on 512 fake images, prepared for QAT and fine-tuned for one epoch."""
    from models import create_model
    from training.data import to_float
    from training.engine import train
    from training.recipes import make_config

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ds, spec = _fake_set(512), _spec()
        net = create_model("simple_cnn", seed=0, width=8, hidden=64)
        cfg = make_config("sgd_onecycle", batch_size=64, epochs=2, threads=1, precision="fp32")
        net = train(net, ds, spec, cfg, progress=False, log=lambda *_: None).model.eval()
        calibration = to_float(ds.images[:256], spec)
        qat = Q.prepare(net, calibration)
        before = {k: v.clone() for k, v in qat.state_dict().items()}
        result = Q.finetune(qat, ds, spec, cfg, epochs=1, log=lambda *_: None)
        batch = to_float(_fake_set(64, seed=1).images, spec).numpy()
        yield dict(net=net, qat=qat, before=before, result=result, batch=batch,
                   dir=tmp_path_factory.mktemp("qat"))
    finally:
        torch.set_num_threads(old)


def test_the_qdq_custom_op_still_exports_with_a_dynamic_batch_as_quantize_dequantize(tmp_path, one_torch_thread):
    """The torch-version workaround (qat.qdq + EXPORT_TRANSLATIONS): torch.export traces it with a dynamic
    batch, torch.onnx writes QuantizeLinear -> DequantizeLinear typed by the zero point, and ONNX Runtime
    computes what the op computes in torch, at batch sizes other than the example's."""
    import onnxruntime as ort

    class Fq(nn.Module):
        def __init__(self):
            super().__init__()
            # weights within +-64: on an AVX2-only CPU, ORT's u8 x s8 kernels saturate larger ones (the
            # reason for reduce_range), which would be a difference of kernels, not of the export
            self.register_buffer("w", torch.randn(4, 3, 3, 3).clamp(-3, 3))
            self.register_buffer("ws", torch.full((4,), 0.05))

        def forward(self, x):
            x = Q.qdq(x, torch.tensor(0.03), torch.tensor(120, dtype=torch.uint8), -1)
            w = Q.qdq(self.w, self.ws, torch.zeros(4, dtype=torch.int8), 0)
            y = nn.functional.conv2d(x, w, padding=1)
            return Q.qdq(y, torch.tensor(0.05), torch.tensor(-3, dtype=torch.int8), -1)

    m = Fq().eval()
    program = torch.onnx.export(m, (torch.randn(2, 3, 8, 8),), dynamo=True, opset_version=18,
                                dynamic_shapes=({0: torch.export.Dim("batch")},),
                                custom_translation_table=Q.EXPORT_TRANSLATIONS, verbose=False)
    path = tmp_path / "qdq.onnx"
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 3 and "Conv" in ops
    zero_point_types = {i.data_type for i in graph.initializer if not i.dims and i.data_type != onnx.TensorProto.FLOAT}
    assert {onnx.TensorProto.UINT8, onnx.TensorProto.INT8} <= zero_point_types
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = m(x).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected,
                               atol=0.05 * 1.01)   # at most one step (0.05) where float32 rounding meets a tie


def test_prepare_finetune_and_export_a_small_cnn_as_an_int8_qdq_graph(trained):
    from lab.backends.onnx_int8 import OnnxInt8Backend
    from lab.hardware import cpu_has_int8_dot
    from training.export import export_onnx, simplify_onnx

    qat, net = trained["qat"], trained["net"]
    assert qat.quantized_layers == ["features.0", "features.3", "features.7", "head"] and not qat.left_float
    assert qat.reduce_range == (not cpu_has_int8_dot())
    for layer in qat.quant_layers():
        for aq in (layer.input_quant, layer.output_quant):
            if aq is not None:
                assert not aq.observing and aq.scale > 0 and 0 <= int(aq.zero_point) <= 255
    # the fine-tune ran with the straight-through estimator: finite loss, the weights moved, the grid did not
    history = trained["result"].history
    assert len(history) == 1 and history[0]["steps"] == 8 and math.isfinite(history[0]["train_loss"])
    after = qat.state_dict()
    assert not torch.equal(after["net.features.0.layer.weight"], trained["before"]["net.features.0.layer.weight"])
    assert torch.equal(after["net.features.0.input_quant.scale"], trained["before"]["net.features.0.input_quant.scale"])
    assert qat.net.features[0].layer.weight is not net.features[0].weight   # prepare copied the net

    out = trained["dir"]
    rec = Q.export_qdq(qat, 0, trained["batch"], out / "model.qat.int8.onnx", threads=1)
    path = out / "model.qat.int8.onnx"
    ops = _ops(path)
    assert ops["QuantizeLinear"] >= 4 and ops["DequantizeLinear"] >= 8
    # ONNX Runtime runs both convolutions and both Linear layers as INT8 kernels, and nothing as a float one
    assert rec["int8_kernels"] == {"QLinearConv": 2, "QGemm": 2} and rec["float_kernels"] == {}
    assert rec["int8_weights"] == 4 and rec["int32_biases"] == 4
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    weights = [i for i in inits.values() if len(i.dims) >= 2]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)   # no float weight left
    qmax = Q.WEIGHT_QMAX[qat.reduce_range]
    assert all(np.abs(onnx.numpy_helper.to_array(i)).max() <= qmax for i in weights)
    # the backend that serves INT8 loads it and agrees with the fake-quant torch net
    batch = trained["batch"]
    got = OnnxInt8Backend(path, threads=1).predict(batch)
    with torch.no_grad():
        expected = qat.eval()(torch.from_numpy(batch)).numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    assert scale > 1.0   # a trained net: logits of a few units, so the tolerance is relative to something
    assert np.abs(got - expected).max() <= Q.PARITY_ATOL * scale
    assert (got.argmax(1) == expected.argmax(1)).mean() >= Q.PARITY_TOP1
    assert rec["parity"]["ok"] and rec["parity"]["images"] == len(batch)
    # int8 weights: the file is about a quarter of the served fp32 graph of the same net (67k weights)
    fp32 = simplify_onnx(export_onnx(net, 0, (3, 32, 32), out / "model.onnx"), out / "model.sim.onnx")
    assert path.stat().st_size < 0.35 * fp32.stat().st_size
    assert rec["bytes"] == path.stat().st_size


def test_custom_cnn_with_tta_exports_its_standardised_filters_as_int8(tmp_path, one_torch_thread):
    """custom_cnn: the WSConv2d's quantized weight is its standardised filter; the squeeze-excite's Linear
    layers (whose weights the SE reads, never called as modules) stay float; six TTA views in the graph."""
    from models import create_model
    from models.custom_layers import WSConv2d
    from training.data import to_float

    spec = _spec()
    net = create_model("custom_cnn", seed=0, width=8).eval()
    calibration = to_float(_fake_set(128).images, spec)
    qat = Q.prepare(net, calibration, activations="u8", reduce_range=True)
    assert [k for k in qat.quantized_layers] == ["features.0", "features.4", "features.8", "head"]
    assert len(qat.left_float) == 4 and all("not called" in s for s in qat.left_float)
    rec = Q.export_qdq(qat, 2, calibration[:32].numpy(), tmp_path / "cnn.onnx", threads=1)
    assert rec["int8_kernels"] == {"QLinearConv": 3, "QGemm": 1} and rec["parity"]["ok"]
    assert rec["tta_level"] == 2 and _ops(tmp_path / "cnn.onnx")["Concat"] >= 1
    # the first conv's int8 weight, dequantized, is its standardised filter within half a step
    first = qat.net.features[0]
    assert isinstance(first.layer, WSConv2d)
    graph = onnx.load(str(tmp_path / "cnn.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    dq = next(n for n in graph.node if n.output[0] == conv.input[1])
    wq, ws = inits[dq.input[0]], inits[dq.input[1]]
    with torch.no_grad():
        w_hat = Q._ws_weight(first.layer).numpy()
    assert wq.dtype == np.int8 and np.abs(wq).max() <= 64
    assert np.all(np.abs(wq * ws[:, None, None, None] - w_hat) <= ws[:, None, None, None] / 2 + 1e-7)


def test_refusals_are_one_line(trained, tmp_path, monkeypatch, one_torch_thread):
    from models import create_model

    def one_line(excinfo):
        assert "\n" not in str(excinfo.value), str(excinfo.value)

    with pytest.raises(Q.QATError, match="no Conv2d, WSConv2d or Linear") as e:
        Q.prepare(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), torch.randn(4, 3, 32, 32))
    one_line(e)
    with pytest.raises(Q.QATError, match="unknown activation type 'u16'") as e:
        Q.prepare(create_model("simple_cnn", seed=0, width=4), torch.randn(4, 3, 32, 32), activations="u16")
    one_line(e)

    class Branchy(nn.Module):   # data-dependent control flow: torch.export cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

        def forward(self, x):
            x = self.conv(x)
            if x.mean() > 0:
                x = -x
            return self.head(x.mean(dim=(2, 3)))

    qat = Q.prepare(Branchy().eval(), torch.randn(8, 3, 32, 32))
    with pytest.raises(Q.QATError, match="cannot be exported to ONNX") as e:
        Q.export_qdq(qat, 0, np.random.randn(4, 3, 32, 32).astype(np.float32), tmp_path / "b.onnx", threads=1)
    one_line(e)

    # an export that is not the trained net (here: the head's integers negated) fails parity
    freeze = Q.QuantLayer.freeze_for_export

    def wrong(self):
        freeze(self)
        if self.kind == "linear" and self.layer.out_features == 10:
            self.export_weight.neg_()

    monkeypatch.setattr(Q.QuantLayer, "freeze_for_export", wrong)
    with pytest.raises(Q.QATError, match="disagrees with the fake-quant torch net") as e:
        Q.export_qdq(trained["qat"], 0, trained["batch"], tmp_path / "bad.onnx", threads=1)
    one_line(e)
