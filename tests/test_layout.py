"""The layout shows the flow: models <- lab <- {training, serving} <- bench. Imports never run upward."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "lab", "training", "serving", "bench")
# what each package may import from the project (besides itself)
ALLOWED = {
    "models": set(),
    "lab": {"models"},
    "training": {"lab", "models"},
    "serving": {"lab", "models"},
    "bench": {"lab", "models", "training", "serving"},
}


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for imported in project_imports(path) - {package} - ALLOWED[package]:
            bad.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not bad, "\n".join(bad)


def test_no_sys_path_preludes():
    """The project is installed (pip install -e .): no script edits sys.path to find it."""
    offenders = [str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                 if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()]
    assert not offenders, offenders


def test_models_stay_pure_torch():
    """models/ needs torch and the standard library, nothing else (no torchvision model code)."""
    third_party = set()
    for path in (REPO / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                third_party.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                third_party |= {a.name.split(".")[0] for a in node.names}
    import sys

    assert third_party - set(sys.stdlib_module_names) <= {"torch", "__future__"}, third_party


def test_onnx_serving_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import lab.backends, lab.card, lab.preprocess, lab.store, serving.catalog, "
            "serving.http_io; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
