"""README.md and docs/: a short front door with a picture up top, links that resolve, commands that run.

Every `python …` command in a code block of README.md and of docs/*.md must name a script or a
`-m` module that exists, and its flags must parse: the script's own argparse parser is captured
in-process (its `main` is called with `ArgumentParser.parse_args` patched to stop right after
parsing), so a renamed or removed flag fails here, in seconds, instead of on a reader's machine.
"""

import argparse
import importlib
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def fenced_blocks(text):
    """The bodies of the shell code blocks (```bash, ```sh or a bare ```) of a markdown text."""
    blocks = re.findall(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S)    # (language, body), in order
    return [body for language, body in blocks if language.strip() in ("", "bash", "sh", "shell", "console")]


def prose(text):
    """The text outside code blocks and inline code spans (where links live)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def python_commands(text):
    """Each `python …` command of the text's code blocks, as its argument list after `python`.

    Lines ending in a backslash are joined, `#` comments dropped, `a && b` split, and leading
    `NAME=value` assignments (DDPM_DATA=…) skipped."""
    commands = []
    for block in fenced_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command = []
            for word in words + ["&&"]:
                if word in ("&&", "||", ";", "|"):
                    while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
                        command.pop(0)
                    if command and command[0] in ("python", "python3"):
                        commands.append(command[1:])
                    command = []
                else:
                    command.append(word)
    return commands


class _Parsed(Exception):
    """Raised by the patched parse_args once the flags have parsed."""


def parse_with_the_scripts_parser(target, args, monkeypatch):
    """None when `python <target> <args>` parses with the script's own parser, else what went wrong."""
    module = importlib.import_module(target)
    main = getattr(module, "main", None)
    if main is None:
        return None if not any(a.startswith("-") for a in args) else flags_in_help(target, args)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        self.allow_abbrev = False                # a flag shortened or renamed in the text does not pass as a prefix
        original(self, argv, namespace)          # a bad flag exits here, with argparse's message on stderr
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [target] + list(args))
    try:
        main(list(args)) if inspect.signature(main).parameters else main()
    except _Parsed:
        return None
    except SystemExit as e:
        return f"exited with {e.code} while parsing"
    finally:
        monkeypatch.undo()
    return "main() returned without parsing any flags"


def flags_in_help(target, args):
    """For a script without a main(): each flag used appears in its --help."""
    help_text = subprocess.run([sys.executable, "-m", target, "--help"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    missing = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in help_text]
    return f"flags not in --help: {missing}" if missing else None


def check_commands(text, where, monkeypatch, capsys):
    problems = []
    commands = python_commands(text)
    assert commands, f"{where}: no python command found in its code blocks"
    for args in commands:
        shown = "python " + " ".join(args)
        if args[0] == "-m":
            target, rest = args[1], args[2:]
            if importlib.util.find_spec(target) is None:
                problems.append(f"{shown}: no module {target}")
                continue
            if target == "pytest":                   # pytest's flags are pytest's; its paths are ours
                problems += [f"{shown}: no {a}" for a in rest
                             if not a.startswith("-") and a.startswith("tests") and not (ROOT / a.split("::")[0]).exists()]
                continue
        else:
            target, rest = args[0], args[1:]
            if not (ROOT / target).is_file() or "/" in target:
                problems.append(f"{shown}: no top-level script {target}")
                continue
            target = target.removesuffix(".py")
        if not rest:
            continue                                 # nothing to parse: the script exists
        error = parse_with_the_scripts_parser(target, rest, monkeypatch)
        if error:
            problems.append(f"{shown}: {error}: {capsys.readouterr().err.strip().splitlines()[-1:]}")
    assert not problems, f"{where}:\n" + "\n".join(problems)


def test_readme_is_a_front_door_of_at_most_250_lines_with_a_picture_in_its_first_40():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the log to a page in docs/"
    top = "\n".join(lines[:40])
    assert re.search(r"!\[[^\]]*\]\([^)]+\.(png|gif|jpg)\)|<img [^>]*src=", top), "no picture in the first 40 lines"


def test_every_relative_link_and_image_in_the_readme_and_docs_resolves_to_a_file():
    broken = []
    for page in [README] + PAGES:
        text = prose(page.read_text())
        targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)      # [text](target), ![alt](target)
        targets += re.findall(r"<(?:img|a)\b[^>]*\b(?:src|href)=\"([^\"]+)\"", text)
        for target in targets:
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue                             # http(s), mailto, or an anchor on the same page
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_every_python_command_in_the_readme_names_a_script_and_its_flags_parse(monkeypatch, capsys):
    check_commands(README.read_text(), "README.md", monkeypatch, capsys)


@pytest.mark.parametrize("page", [p for p in PAGES if python_commands(p.read_text())], ids=lambda p: p.name)
def test_every_python_command_in_a_docs_page_names_a_script_and_its_flags_parse(page, monkeypatch, capsys):
    check_commands(page.read_text(), f"docs/{page.name}", monkeypatch, capsys)


def test_the_checker_catches_a_missing_script_and_an_unknown_flag(monkeypatch, capsys):
    with pytest.raises(AssertionError, match="no top-level script"):
        check_commands("```bash\npython no_such_script.py\n```\n", "t", monkeypatch, capsys)
    with pytest.raises(AssertionError, match="exited with 2"):
        check_commands("```bash\nDDPM_DATA=x python generate.py --no-such-flag 3\n```\n", "t", monkeypatch, capsys)
    with pytest.raises(AssertionError, match="exited with 2"):
        check_commands("```bash\npython generate.py --guid 1\n```\n", "t", monkeypatch, capsys)   # a prefix is not the flag
    with pytest.raises(AssertionError, match="no module"):
        check_commands("```bash\npython -m tools.no_such_tool --x\n```\n", "t", monkeypatch, capsys)
    check_commands("```bash\npip install x && python generate.py --n 4 \\\n  --steps 10  # ok\n```\n", "t", monkeypatch, capsys)


def test_readme_commands_name_no_machine_path():
    """Readers' commands say DDPM_DATA=path/to/data, never the build machine's ../shared/data."""
    blocks = "\n".join(fenced_blocks(README.read_text()))
    assert "../shared" not in blocks and "/" + "work/" not in blocks     # no build-machine path (spelt so this file holds none)


def test_readme_figures_live_where_no_command_writes():
    readme = README.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)|<img [^>]*src=\"([^\"]+)\"", readme)
    figures = [a or b for a, b in figures]
    assert figures and all(f.startswith("docs/") for f in figures), figures
    ignored = subprocess.run(["git", "check-ignore", "-q", "samples/mnist_step500.png"], cwd=ROOT).returncode
    assert ignored == 0, "samples/ outputs would show up in git status"


def test_readme_setup_states_the_offline_case_and_the_cpu_wheel():
    readme = README.read_text()
    setup = readme[readme.index("## Setup"):readme.index("## ", readme.index("## Setup") + 3)]
    assert "DDPM_DATA" in setup and "whl/cpu" in setup


def test_every_row_of_the_bad_input_table_names_a_test_that_exists():
    """docs/bad_input.md says what a user sees for each bad input; each row names the test that checks it."""
    table = (ROOT / "docs" / "bad_input.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", table))
    defined = {m for f in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert len(named) >= 15 and not named - defined, sorted(named - defined)
