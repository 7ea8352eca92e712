"""The shape of the package: imports point one way (a folder knows nothing of the folders
above it), every folder says what it owns, and vLLM's general plugin, which every vLLM
process loads, brings none of the trainer with it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "livetrain"

# Each folder (or top-level module) of livetrain and its layer: it may import only from
# lower layers (docs/architecture.md draws the same picture).
LAYERS = {
    "options": 0, "formats": 0, "cpus": 0, "procfs": 0,
    "optim": 1, "weights": 1, "checkpoint": 1,
    "train": 2,
    "session": 3,
    "worker": 4,
    "routes": 5,
    "vllm_plugin": 6,
    "leftovers": 7, "default_model": 7, "client": 7,
    "serve": 8,
    "demo": 9,
    "cli": 10,
}


def unit_of(module: str) -> str:
    """``livetrain.train.step`` -> ``train``; ``livetrain.cli`` -> ``cli``."""
    return module.split(".")[1]


def livetrain_imports(path: Path) -> set[str]:
    """The livetrain modules a file imports, at module level or inside functions."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("livetrain."):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name.startswith("livetrain."))
    return imported


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__" or parts[-1] == "__main__":
            parts = parts[:-1]
        if len(parts) > 1:
            out.append((".".join(parts), path))
    return out


def test_every_folder_and_top_level_module_has_a_layer():
    assert {unit_of(module) for module, _ in modules()} == set(LAYERS)


@pytest.mark.parametrize("module,path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(module, path):
    here = unit_of(module)
    upward = sorted(name for name in livetrain_imports(path)
                    if unit_of(name) != here and LAYERS[unit_of(name)] >= LAYERS[here])
    assert not upward, f"{module} ({here}, layer {LAYERS[here]}) imports from its own layer or above: {upward}"


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_folder_says_what_it_owns(folder):
    docstring = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
    assert docstring and len(docstring.split()) >= 6, f"livetrain/{folder}/__init__.py needs a docstring"


def test_the_general_plugin_imports_none_of_the_trainer():
    trainer = ("livetrain.optim", "livetrain.train", "livetrain.checkpoint", "livetrain.worker",
               "livetrain.session")
    code = ("import json, sys; import livetrain.vllm_plugin.plugins; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('livetrain.'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                       cwd=PACKAGE.parent).stdout)
    assert loaded and not [m for m in loaded if m.startswith(trainer)], loaded
