"""runlog.py: what a run shows and leaves behind. log.csv from step 1, the TensorBoard events, the
progress bar on --max-minutes' clock, and an end-of-run grid sized from the measured speed."""


import pytest

from plumbing import runlog
import train_mnist
from conftest import run


def test_first_log_row_is_step_one_and_the_run_says_where_its_files_go(data_dir, tmp_path, capsys):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "3", "--log-every", "50")
    out = capsys.readouterr().out
    rows = (tmp_path / "runs" / "mnist" / "log.csv").read_text().splitlines()
    assert rows[1].startswith("1,") and rows[-1].startswith("3,")
    assert f"logs in {tmp_path / 'runs' / 'mnist'}" in out and str(ckpt_dir / "mnist.pt") in out


def test_tensorboard_events_hold_scalars_and_grids(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(train_mnist, tmp_path, "--steps", "2", "--tensorboard", "--sample-every", "1", "--sample-count", "4",
        "--sample-steps", "2")
    events = EventAccumulator(str(tmp_path / "runs" / "mnist"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s"} <= set(tags["scalars"])
    assert "samples" in tags["images"]


def test_end_of_run_grid_is_sized_from_the_measured_speed():
    # 1 ms per image and network call, 100 steps: 64 images cost 6.4 s.
    assert runlog.plan_final_grid(64, 100, 1e-3, run_seconds=900) == 64          # 6.4 s ≤ 3% of 15 min
    assert runlog.plan_final_grid(64, 100, 1e-3, run_seconds=120) == 32          # 3% of 2 min = 3.6 s
    assert runlog.plan_final_grid(64, 100, 1e-3, run_seconds=10) == 0            # skipped, with a message
    assert runlog.grid_seconds(32, 100, 1e-3) <= 0.03 * 120


@pytest.mark.parametrize("resume_step, kept", [(2, ["1"]), (0, None), (None, None)],
                         ids=["resume-keeps-saved-steps", "resume-before-any", "fresh-run"])
def test_eval_csv_keeps_only_rows_of_saved_steps(tmp_path, resume_step, kept):
    """A resumed run keeps the evaluations up to its checkpoint's step; with none left, or in a new
    run, an earlier eval.csv goes (its rows are of steps this run's checkpoint never held)."""
    (tmp_path / "eval.csv").write_text("step,proxy_fid\n1,20.0\n3,18.0\n")
    runlog.RunLog(tmp_path, resume_step=resume_step, tensorboard=False)
    path = tmp_path / "eval.csv"
    if kept is None:
        assert not path.exists()
    else:
        assert [line.split(",")[0] for line in path.read_text().splitlines()[1:]] == kept
