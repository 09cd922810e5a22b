"""Architecture rules that the import-linter contracts (pyproject.toml) do not check.

Function-local imports of the package's own modules: allowed only where a top-level import would
make a light module heavy (pull torch, Lightning, scikit-learn, Pillow/OpenCV, ONNX Runtime,
FastAPI or Gradio into a module that does not need them at import time, above all the CLI's
start-up), would be circular, or must run in another process or inside an error handler. Every
such (importing module, imported module) pair is listed below; a new one fails the test until it
is listed with its reason or moved to the top of the module (docs/architecture.md).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# importing module -> the package modules it may import inside functions ("*": any; prefix
# ``malaria_screen.`` left out). A name taken from a package's lazy ``_LAZY`` table counts as
# the module it comes from (``from malaria_screen.inference import Predictor`` is
# ``inference.predictor``).
ALLOWED = {
    # the CLI: command groups are imported for --help; what a command needs is imported when it
    # runs (Pillow, OpenCV, torch, scikit-learn, ...; quantify, parasitemia and model_comparison are
    # light but cost CLI start-up time for no --help use)
    "cli.core": "data.dataset data.parallel evaluation.quantify evaluation.report inference.base inference.distributed "
                "inference.run_evaluation models research.multiclass training.run",
    "cli.deploy": "app data.dataset data.io data.parallel export.bench export.onnx export.pipeline export.split_cells "
                  "inference.base inference.ensemble inference.gradcam inference.onnx_predictor inference.predictor inference.site "
                  "models serve serve.server",
    "cli.domain": "inference.base inference.onnx_predictor smear.domain",
    "cli.research": "data.datamodule data.dataset data.split models research.cv research.features research.lr_find "
                    "research.model_comparison",
    "cli.smear": "data.io data.parallel smear.crop_export smear.domain smear.evaluate smear.parasitemia smear.report "
                 "smear.rescore smear.slides",
    # scikit-learn only when metrics are computed
    "export.backend_agreement": "evaluation.metrics",
    "inference.ensemble": "evaluation.metrics",
    # torch only when exporting (quantize_int8 and the metadata helpers run without it)
    "export.onnx": "data.normalize",
    "export.pipeline": "inference.onnx_predictor inference.predictor",
    # the lazy package namespace: `import malaria_screen.inference` loads no back-end
    "inference": "inference.base inference.ensemble inference.onnx_predictor inference.predictor inference.site",
    # imported by the CLI at start-up; decoding (Pillow, OpenCV) only when scoring
    "inference.known_labels": "inference.base",
    # the model families import the registry to register themselves: circular at the top
    "models.registry": "models",
    # torch and Lightning only when training
    "research.cv": "inference.predictor training.run",
    "research.lr_find": "data.datamodule training.module training.run",
    "research.model_comparison": "data.dataset data.split evaluation.report inference.predictor models training.run",
    "training.run": "data.datamodule data.transforms training.module",
    # smear's dependencies are optional for the cell endpoints; field workers import inside
    # their error handler, in their own process
    "serve.api": "serve.fieldjob smear.domain smear.screen",
    "serve.jobs": "inference serve.celljob serve.fieldjob smear.domain smear.report smear.rescore",
    # the web app runs on the torch-free install (ONNX model: no Grad-CAM, so no torch) and
    # without the smear extra (scikit-image): its tabs import them when built or run
    "app.gradio_app": "inference.gradcam smear.domain smear.labelling smear.report smear.screen smear.slide",
    "cli.adapt": "smear.adapt smear.labels",
    # the package namespace imports this module inside load_model
    "inference.site": "inference",
}


def _lazy_table(package: str) -> dict[str, str]:
    init = SRC / package.replace(".", "/") / "__init__.py"
    if not init.is_file():
        return {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_LAZY":
            table = ast.literal_eval(node.value)
            return {k: v if v.startswith("malaria_screen") else f"{package}.{v}" for k, v in table.items()}
    return {}


def _local_package_imports() -> dict[str, set[str]]:
    """importing module -> package modules it imports inside a function (prefix left out)."""
    out: dict[str, set[str]] = {}
    for path in sorted((SRC / "malaria_screen").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                targets = []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "malaria_screen":
                    lazy = _lazy_table(node.module)
                    targets = [lazy.get(a.name, node.module) for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names if a.name.split(".")[0] == "malaria_screen"]
                for t in targets:
                    short = t.removeprefix("malaria_screen.")
                    out.setdefault(module.removeprefix("malaria_screen."), set()).add(short)
    return out


def test_function_local_imports_of_package_modules_are_the_listed_ones():
    found = _local_package_imports()
    new = {m: sorted(t - set(ALLOWED.get(m, "").split())) for m, t in found.items() if ALLOWED.get(m) != "*"}
    new = {m: t for m, t in new.items() if t}
    assert not new, (f"function-local imports of package modules not in tests/test_architecture.py ALLOWED: {new}. "
                     "Import them at the top of the module, or list them with the reason (docs/architecture.md)")
    stale = {m: sorted(set(a.split()) - found.get(m, set())) for m, a in ALLOWED.items() if a != "*"}
    stale = {m: t for m, t in stale.items() if t}
    assert not stale, f"ALLOWED lists function-local imports that are gone; remove them: {stale}"


def test_cli_help_imports_no_heavy_library():
    """``malaria-screen --help`` stays fast: no torch, Lightning, OpenCV, Pillow, scikit-learn,
    SciPy, matplotlib, ONNX Runtime, FastAPI or Gradio."""
    heavy = {"torch", "torchvision", "lightning", "cv2", "PIL", "sklearn", "scipy", "skimage", "matplotlib",
             "onnxruntime", "onnx", "fastapi", "gradio", "pandas"}
    code = ("import sys\nfrom malaria_screen.cli import app\n"
            "try:\n    app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(heavy)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-500:]


def _imports(tree: ast.Module) -> tuple[set[str], list[tuple[int, str]]]:
    """(modules imported at the top, [(line, module) imported inside functions]) of one module's
    third-party and standard-library imports."""
    top: set[str] = set()
    for node in tree.body:
        for n in [node, *(node.body if isinstance(node, ast.Try) else [])]:
            if isinstance(n, ast.Import):
                top |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0:
                top.add(n.module)
    local = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                if isinstance(n, ast.Import):
                    local += [(n.lineno, a.name) for a in n.names]
                elif isinstance(n, ast.ImportFrom) and n.level == 0:
                    local.append((n.lineno, n.module))
    return top, [(line, m) for line, m in local if m.split(".")[0] != "malaria_screen"]


def test_function_local_imports_are_for_heavy_libraries_only():
    """Not the standard library (cheap, always there), and not a module the file already imports
    at its top (``from PIL import Image`` inside a function of a module that imports PIL.Image)."""
    bad = []
    for path in sorted((SRC / "malaria_screen").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if ALLOWED.get(module.removeprefix("malaria_screen.")) == "*":
            continue
        top, local = _imports(ast.parse(path.read_text(encoding="utf-8")))
        bad += [f"{module}:{line} {m}" for line, m in local if m.split(".")[0] in sys.stdlib_module_names or m in top]
    assert not bad, f"move these imports to the top of their module: {bad}"
