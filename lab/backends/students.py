"""Students: cheaper networks trained to reproduce the served one (training/compress/students.py), each
run by ONNX Runtime in fp32 and INT8 with one view. A student is data: one entry of STUDENTS below
registers its two backends, `<student>_1view` and `<student>_int8_1view`, with their files
`student.<student>.sim.onnx` and `student.<student>.int8.onnx`, made by the export hook `students`."""
from __future__ import annotations

from lab.backends.base import register_backend
from lab.backends.onnx import OnnxBackend

STUDENTS = {  # name -> (method, what it is); the training side's table is training/compress/students.py
    "distilled": ("distillation", "the served architecture, distilled from its six-view outputs"),
    "narrow80": ("distillation", "0.8 of the served widths, distilled"),
    "narrow60": ("distillation", "0.6 of the served widths, distilled"),
    "pruned": ("pruning", "the served network pruned to half its one-view MACs, fine-tuned by distillation"),
    "finetuned": ("distillation", "the served network's own weights fine-tuned with one view on its six-view outputs"),
}


def _student_backends(student: str, method: str, what: str) -> None:
    for suffix, file, kind in (("", "sim.onnx", "fp32"), ("_int8", "int8.onnx", "static INT8 (QDQ)")):
        register_backend(type(f"Student_{student}{suffix}", (OnnxBackend,), {
            "name": f"{student}{suffix}_1view", "file": f"student.{student}.{file}",
            "description": f"ONNX Runtime, {kind}, one view: {what}", "serve_by_default": False,
            "network": student, "method": method, "views": 1, "__module__": __name__}))


for _name, (_method, _what) in STUDENTS.items():
    _student_backends(_name, _method, _what)
