"""The layout's rules: the top level holds the lesson and what people run, scripts are run and never
imported, loading data or the FID networks does not import the model, every file states its job in
its docstring's first line, and every script answers --help with that line.

A *script* is any file outside tests/ with an `if __name__ == "__main__":` block (train_*.py,
generate*.py, fid.py, app.py, tools/*.py), except the library modules diffusion, samplers, unet, ema
and trainer. What two scripts share lives in a library module.
"""

import ast
import importlib
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


def first_docstring_line(tree):
    """The first line of a module's docstring, as written (None without one)."""
    doc = ast.get_docstring(tree, clean=False)
    return None if doc is None else doc.split("\n")[0]


@pytest.mark.parametrize("name", sorted(TREES))
def test_every_file_states_its_job_in_its_docstrings_first_line(name):
    line = first_docstring_line(TREES[name])
    assert line is not None, f"{name} has no docstring; its first line should say what the file is for"
    assert len(line.split()) >= 5, f"{name}: the docstring's first line {line!r} does not say what the file does"
    assert not line.lstrip().startswith(("python ", "usage", "Usage", "DDPM_DATA")), f"{name}: a command, not a job"


def test_the_docstring_rule_reads_the_first_line_as_written():
    """The check above can fail: a docstring that starts on its second line has an empty first line."""
    assert first_docstring_line(ast.parse('"""\nTrain a model."""')) == ""
    assert first_docstring_line(ast.parse("x = 1")) is None


def main_block_calls_main(tree):
    """Whether `if __name__ == "__main__":` runs main() with no arguments (so that main reads sys.argv)."""
    block = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    return any(isinstance(node, ast.Call) and ast.unparse(node.func) == "main" and not node.args
               for node in ast.walk(block))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_answers_help_with_its_job(name, capsys):
    """`python SCRIPT --help` (`python -m tools.NAME --help`), run in-process through main(argv): it exits
    with 0 and opens with the usage line and the docstring's first line."""
    assert main_block_calls_main(TREES[name]), f"{name}: its __main__ block should call main()"
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: "), out[:200]
    job = first_docstring_line(TREES[name]).strip()
    assert job in out, f"{name} --help does not show its job: {job!r}"
