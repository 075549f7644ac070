"""Students: cheaper networks trained to reproduce the served one (training/compress/students.py), each
run with one view by ONNX Runtime in fp32 and INT8 and by OpenVINO at bf16 inference precision. A student
is data: one entry of STUDENTS below registers its three backends, `<student>_1view`,
`<student>_int8_1view` and `<student>_openvino_bf16_1view`, with their files `student.<student>.sim.onnx`
and `student.<student>.int8.onnx` (OpenVINO compiles the fp32 one), made by the export hook `students`."""
from __future__ import annotations

from lab.backends.base import register_backend
from lab.backends.onnx import OnnxBackend
from lab.backends.openvino import OpenVinoBf16Backend

STUDENTS = {  # name -> (method, what it is); the training side's table is training/compress/students.py
    "distilled": ("distillation", "the served architecture, distilled from its six-view outputs"),
    "narrow80": ("distillation", "0.8 of the served widths, distilled"),
    "narrow60": ("distillation", "0.6 of the served widths, distilled"),
    "pruned": ("pruning", "the served network pruned to half its one-view MACs, fine-tuned by distillation"),
    "finetuned": ("distillation", "the served network's own weights fine-tuned with one view on its six-view outputs"),
}


RUNTIMES = (  # (name suffix, backend class, file suffix, what runs it) of each student's backends
    ("", OnnxBackend, "sim.onnx", "ONNX Runtime, fp32"),
    ("_int8", OnnxBackend, "int8.onnx", "ONNX Runtime, static INT8 (QDQ)"),
    ("_openvino_bf16", OpenVinoBf16Backend, "sim.onnx", "OpenVINO, bf16 inference precision"),
)


def _student_backends(student: str, method: str, what: str) -> None:
    for suffix, base, file, runtime in RUNTIMES:
        register_backend(type(f"Student_{student}{suffix}", (base,), {
            "name": f"{student}{suffix}_1view", "file": f"student.{student}.{file}",
            "description": f"{runtime}, one view: {what}", "serve_by_default": False,
            "network": student, "method": method, "views": 1, "__module__": __name__}))


for _name, (_method, _what) in STUDENTS.items():
    _student_backends(_name, _method, _what)
