"""docs/whiteboard.md quotes, for every equation, the line of code that computes it and names
that line's number. These tests keep the page true: each quoted line must stand, word for word
(its trailing comment may be left out), at the line it names. `python -m tools.whiteboard`
renumbers moved lines; a changed line still fails here."""

import importlib.util

from conftest import ROOT

spec = importlib.util.spec_from_file_location("whiteboard", ROOT / "tools" / "whiteboard.py")
whiteboard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(whiteboard)


def page_rows():
    return whiteboard.rows((ROOT / "docs" / "whiteboard.md").read_text())


def test_whiteboard_names_every_core_equation():
    quoted = " ".join(code for _, _, code in page_rows())
    for name in ["sqrt_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
                 "eps_coef", "log_var_small", "log_var_large", "w * out_uncond", "w * out_guide", "self.sigma_lo < sigma", "sigma = eta", "F.mse_loss",
                 "f / f[0]", "norm2(h) * (1 + gamma) + beta", "θ_ema += (1 − d)", "beta ** 2 / (2 * sigma2",
                 "x = randn() if x_T is None", "for i in reversed(range(self.num_timesteps))", "self.opt.step()"]:
        assert name in quoted, f"the whiteboard quotes no line with {name!r}"


def test_each_whiteboard_line_number_points_at_the_quoted_code():
    rows = page_rows()
    assert len(rows) >= 30, "the whiteboard table rows were not found; was the row format changed?"
    for file, lineno, code in rows:
        found = whiteboard.where(file, code)
        assert found, f"{file}: the whiteboard quotes `{code}`, which is no longer in the file"
        assert int(lineno) in found, (f"{file}: `{code}` is at line {found}, the whiteboard says L{lineno}; "
                                      "run python -m tools.whiteboard")


def test_the_rewrite_script_renumbers_a_moved_line_and_refuses_a_changed_one(tmp_path):
    page = tmp_path / "whiteboard.md"
    good = "| a | b | [diffusion.py:L1](../diffusion.py#L1) | `return betas.clamp(max=max_beta)` |\n"
    changed = "| a | b | [diffusion.py:L2](../diffusion.py#L2) | `return betas.clamp(max=0.5)` |\n"
    page.write_text(good + changed)
    missing = whiteboard.rewrite(page)
    (file, lineno, _), (_, unchanged, _) = whiteboard.rows(page.read_text())
    assert int(lineno) in whiteboard.where("diffusion.py", "return betas.clamp(max=max_beta)") and int(lineno) > 1
    assert unchanged == "2" and missing == ["diffusion.py: `return betas.clamp(max=0.5)`"]
