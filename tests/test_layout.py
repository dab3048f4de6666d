"""The layout's rules: the top level holds the lesson and what people run, scripts are run and never
imported, and loading data or the FID networks does not import the model.

A *script* is any file outside tests/ with an `if __name__ == "__main__":` block (train_*.py,
generate*.py, fid.py, app.py, tools/*.py), except the library modules diffusion, samplers, unet, ema
and trainer. What two scripts share lives in a library module.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"diffusion", "samplers", "unet", "ema", "trainer"}
SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("plumbing/*.py"), *ROOT.glob("scoring/*.py"),
                  *ROOT.glob("tools/*.py")])


def module_name(path):
    """plumbing/data.py -> "plumbing.data"; generate.py -> "generate"."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def is_script(tree):
    """Whether a module has an `if __name__ == "__main__":` block at its top level."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def imported_modules(tree):
    """Every module an import statement names anywhere in the file (inside functions too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)   # `from tools import x`


TREES = {module_name(p): ast.parse(p.read_text(), str(p)) for p in SOURCES}
SCRIPTS = {name for name, tree in TREES.items() if is_script(tree) and name not in LIBRARY}


def test_the_top_level_holds_at_most_13_python_files_and_the_lesson():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 13, top
    assert {"diffusion.py", "samplers.py", "unet.py", "ema.py", "trainer.py", "generate.py"} <= set(top)


def test_the_scripts_are_the_ones_people_run():
    assert {"train_mnist", "train_cifar", "train_celeba", "generate", "generate_cifar", "fid", "app",
            "tools.benchmark", "tools.gpu_stage"} <= SCRIPTS
    assert not SCRIPTS & {name for name in TREES if name.startswith(("plumbing.", "scoring."))}


@pytest.mark.parametrize("name", sorted(TREES))
def test_no_module_imports_a_script(name):
    imports = set(imported_modules(TREES[name]))
    assert not imports & (SCRIPTS - {name}), f"{name} imports the script(s) {sorted(imports & SCRIPTS)}"


def test_the_rule_catches_an_imported_script():
    """The check above can fail: a module that imports a trainer is caught."""
    tree = ast.parse("def f():\n    import train_cifar\nfrom tools import benchmark\n")
    assert {"train_cifar", "tools.benchmark"} <= set(imported_modules(tree)) & SCRIPTS


def test_loading_data_and_the_fid_networks_does_not_import_the_model():
    """In a fresh interpreter, each module in turn; the first one that brings the model in is named."""
    code = ("import importlib, sys\n"
            "for name in ['plumbing.files', 'plumbing.data', 'scoring.inception', 'scoring.proxy']:\n"
            "    importlib.import_module(name)\n"
            "    print(name, sorted({'diffusion', 'unet', 'samplers'} & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["plumbing.files []", "plumbing.data []", "scoring.inception []",
                                       "scoring.proxy []"], out.stdout
