"""Keep docs/whiteboard.md's line numbers true: each row quotes a line of code and names its line.

    python -m tools.whiteboard          # rewrite every row's L<n> to where its quoted line stands now

A moved line gets its new number; a quoted line that changed or vanished is not guessed at: the
script names it and exits with 1 (and tests/test_whiteboard.py fails on it until the row is fixed).
"""

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "whiteboard.md"
ROW = re.compile(r"\[([\w/]+\.py):L(\d+)\]\(\.\./\1#L\2\) \| `(.+)` \|\s*$")


def rows(text):
    """-> [(file, line number, quoted code)] for every row of the page."""
    return [m.groups() for m in map(ROW.search, text.splitlines()) if m]


def where(file, code):
    """The line numbers (1-based) of `file` that start with the quoted code (its trailing comment may be left out)."""
    lines = (ROOT / file).read_text().splitlines()
    return [i + 1 for i, line in enumerate(lines) if line.strip().startswith(code.strip())]


def rewrite(page=PAGE):
    """Renumber every row whose quoted line moved; -> the rows whose code is no longer found."""
    missing, out = [], []
    for line in page.read_text().splitlines(keepends=True):
        m = ROW.search(line)
        if m:
            file, lineno, code = m.groups()
            found = where(file, code)
            if not found:
                missing.append(f"{file}: `{code}`")
            elif int(lineno) not in found:
                new = found[0]
                line = line.replace(f"[{file}:L{lineno}](../{file}#L{lineno})", f"[{file}:L{new}](../{file}#L{new})")
        out.append(line)
    page.write_text("".join(out))
    return missing


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    gone = rewrite()
    for row in gone:
        print(f"no longer in the code, fix this row by hand: {row}")
    return 1 if gone else 0


if __name__ == "__main__":
    sys.exit(main())
