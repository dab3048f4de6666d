"""README.md: its own commands leave `git status` clean, and its setup covers the offline case."""

import re
import subprocess

from conftest import ROOT


def test_readme_figures_live_where_no_command_writes():
    readme = (ROOT / "README.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert figures and all(not f.startswith("samples/") for f in figures), figures
    ignored = subprocess.run(["git", "check-ignore", "-q", "samples/mnist_step500.png"], cwd=ROOT).returncode
    assert ignored == 0, "samples/ outputs would show up in git status"


def test_readme_setup_states_the_offline_case_and_the_cpu_wheel():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Setup"):readme.index("## ", readme.index("## Setup") + 3)]
    assert "DDPM_DATA" in setup and "whl/cpu" in setup


def test_every_row_of_the_bad_input_table_names_a_test_that_exists():
    """docs/bad_input.md says what a user sees for each bad input; each row names the test that checks it."""
    table = (ROOT / "docs" / "bad_input.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", table))
    defined = {m for f in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert len(named) >= 15 and not named - defined, sorted(named - defined)
