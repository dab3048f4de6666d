"""docs/whiteboard.md quotes, for every equation, the line of code that computes it and names
that line's number. These tests keep the page true: each quoted line must stand, word for word (its trailing comment may be left out),
at the line it names."""

import re

from conftest import ROOT

ROW = re.compile(r"\[(\w+\.py):L(\d+)\]\(\.\./\1#L\2\) \| `(.+)` \|\s*$")


def whiteboard_rows():
    rows = [ROW.search(line) for line in (ROOT / "docs" / "whiteboard.md").read_text().splitlines()]
    return [m.groups() for m in rows if m]


def test_whiteboard_names_every_core_equation():
    quoted = " ".join(code for _, _, code in whiteboard_rows())
    for name in ["sqrt_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
                 "eps_coef", "log_var_small", "log_var_large", "guidance", "sigma = eta", "F.mse_loss",
                 "f / f[0]", "norm2(h) * (1 + gamma) + beta", "θ_ema += (1 − d)"]:
        assert name in quoted, f"the whiteboard quotes no line with {name!r}"


def test_each_whiteboard_line_number_points_at_the_quoted_code():
    rows = whiteboard_rows()
    assert len(rows) >= 30, "the whiteboard table rows were not found; was the row format changed?"
    for file, lineno, code in rows:
        lines = (ROOT / file).read_text().splitlines()
        where = [i + 1 for i, line in enumerate(lines) if line.strip().startswith(code.strip())]
        assert where, f"{file}: the whiteboard quotes `{code}`, which is no longer in the file"
        assert int(lineno) in where, f"{file}: `{code}` is at line {where}, the whiteboard says L{lineno}"
