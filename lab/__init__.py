"""The shared layer: the contracts every stage speaks. Training, serving and the benchmarks import it;
it imports none of them (tests/test_layout.py enforces the direction).

  lab.preprocess  the one preprocessing definition (NumPy + Pillow): image bytes -> model input
  lab.card        the model card (typed, validated on read) and the integrity check of its files
  lab.runfiles    the typed files of a run folder (trained.json, metrics.json, export.json, ...)
  lab.backends    the backend registry: onnx, onnx_int8, torch, torch_bf16, ... (one file each)
  lab.store       BentoML's model store: publish all-or-nothing, list and get lab models by tag
  lab.paths       where data, caches, runs and the store live
  lab.hardware    what this machine can do (native bf16, cores)
  lab.student_t   Student's t distribution (intervals from a few seeds or rounds; no SciPy)

Nothing here imports torch at module level: the ONNX serving path runs without torch installed.
"""
