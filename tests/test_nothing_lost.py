"""Nothing lost: one run per checkpoint, output folders checked before any work, and a save that
fails (a full disk) keeps the previous checkpoint and says so in one line."""

import errno
import io
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from plumbing import checkpoint
import train_mnist
from conftest import ROOT, TINY, run


def step_of(path):
    return torch.load(path, weights_only=True)["step"]


# Another process that holds a run's lock as a training run does (RunLock), says so, and waits.
HOLD_LOCK = ("import sys; from plumbing.files import RunLock; RunLock(sys.argv[1]).acquire(); "
             "print('holding', flush=True); sys.stdin.read()")


def test_a_second_run_on_the_same_checkpoint_is_refused_and_a_killed_runs_lock_is_taken_over(
        data_dir, tmp_path, capsys):
    run(train_mnist, tmp_path, "--steps", "2")                         # a run to continue
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "ckpt" / "mnist.pt")], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "holding\n"                 # blocks until the lock is held: no clock
        with pytest.raises(SystemExit) as e:
            run(train_mnist, tmp_path, "--steps", "3", "--resume")
        message = str(e.value)
        assert "being trained by another run" in message and f"pid {first.pid}" in message, message
        assert "--run-name" in message and "\n" not in message
        assert first.poll() is None                                   # the holder never noticed
    finally:
        first.send_signal(signal.SIGKILL)                             # killed: no release, a stale lock
        first.wait()
    assert f"pid {first.pid}" in (tmp_path / "ckpt" / "mnist.lock").read_text()
    saved = step_of(tmp_path / "ckpt" / "mnist.pt")
    run(train_mnist, tmp_path, "--steps", str(saved + 2), "--resume")
    said = capsys.readouterr().out
    assert "took over the lock of an earlier run" in said and f"pid {first.pid}" in said
    assert step_of(tmp_path / "ckpt" / "mnist.pt") == saved + 2       # it resumed the run's last save
    assert (tmp_path / "ckpt" / "mnist.lock").read_text() == ""       # released at the end


@pytest.mark.parametrize("flag", ["--ckpt-dir", "--sample-dir", "--log-dir"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_data_loads(
        flag, data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    folders = {"--ckpt-dir": tmp_path / "ckpt", "--sample-dir": tmp_path / "samples", "--log-dir": tmp_path / "runs"}
    folders[flag] = blocker / "inside"
    argv = [*TINY, "--steps", "2", *[x for k, v in folders.items() for x in (k, str(v))]]
    with pytest.raises(SystemExit) as e:
        train_mnist.main(argv)
    message = str(e.value)
    assert message.startswith(f"error: {flag} {blocker / 'inside'}: cannot write there") and "\n" not in message
    assert "=== loading" not in capsys.readouterr().out
    assert not (tmp_path / "ckpt").exists()


def test_a_folder_made_read_only_is_refused_and_the_earlier_checkpoint_and_log_stay(data_dir, tmp_path):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "2")
    before = {p: p.read_bytes() for p in [ckpt_dir / "mnist.pt", tmp_path / "runs" / "mnist" / "log.csv"]}
    if os.geteuid() == 0:                                  # root ignores mode bits: make the folder immutable
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(ckpt_dir)]).returncode:
            pytest.skip("chattr +i is not available here, and root ignores mode bits")
    else:
        ckpt_dir.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            run(train_mnist, tmp_path, "--steps", "4", "--resume")
        assert str(e.value).startswith(f"error: --ckpt-dir {ckpt_dir}: cannot write there")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ckpt_dir)])
        else:
            ckpt_dir.chmod(0o755)
    assert all(p.read_bytes() == data for p, data in before.items())


class FullDisk(io.RawIOBase):
    """A file whose disk fills up `room` bytes into it: every write after that raises ENOSPC."""

    def __init__(self, f, room):
        super().__init__()
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def full_disk_at(monkeypatch, bad_steps, which=lambda obj: True):
    """The disk fills up 2 kB into each file of these steps' saves (those `which` picks): torch.save's
    own zip writer meets ENOSPC part way, as on a real full disk, where it raises a RuntimeError."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") in bad_steps and which(obj):
            f = FullDisk(f, 2000)
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_keeps_the_previous_checkpoint_says_so_and_the_run_goes_on(data_dir, tmp_path, monkeypatch,
                                                                                capsys):
    full_disk_at(monkeypatch, {4})
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "6", "--save-every", "2")
    lines = [line for line in capsys.readouterr().out.splitlines() if "could not save step 4" in line]
    assert len(lines) == 1 and "full disk" in lines[0] and "previous checkpoint is intact (step 2)" in lines[0]
    assert step_of(ckpt_dir / "mnist.pt") == 6                        # the next save went through


def test_a_full_disk_at_the_last_save_stops_saying_which_checkpoint_is_left(data_dir, tmp_path, monkeypatch):
    full_disk_at(monkeypatch, {5})
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path, "--steps", "5", "--save-every", "2")
    assert "without saving it" in str(e.value) and "at step 4" in str(e.value)
    assert step_of(tmp_path / "ckpt" / "mnist.pt") == 4               # intact, and loads
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".tmp"]     # no half-written file


def test_a_failed_save_of_a_finished_run_is_written_again_by_resume(data_dir, tmp_path, monkeypatch):
    """<run>.pt is written last: the EMA file's write fails at the last step, so <run>.pt stays at the
    save before, and --resume trains the steps again and writes every file, the EMA's included."""
    full_disk_at(monkeypatch, {4}, which=lambda obj: "ema_model" in obj)
    with pytest.raises(SystemExit):
        run(train_mnist, tmp_path, "--steps", "4", "--save-every", "2")
    ckpt_dir = tmp_path / "ckpt"
    assert step_of(ckpt_dir / "mnist.pt") == 2 and step_of(ckpt_dir / "mnist_ema.pt") == 2
    monkeypatch.undo()
    run(train_mnist, tmp_path, "--steps", "4", "--resume")
    assert step_of(ckpt_dir / "mnist.pt") == 4 and step_of(ckpt_dir / "mnist_ema.pt") == 4


def test_a_signal_during_the_last_save_waits_for_it(data_dir, tmp_path, monkeypatch):
    """The run ends by its budget and a SIGTERM arrives as the end's save begins: the trainer's handler
    still holds it (the handler from before would kill the process mid-write), the save completes,
    and the run exits with the signal's status."""
    import trainer
    real, met = trainer.save_run, []

    def save_run(path, ema_path, config, model, ema, optimizer, step, *args):
        if step == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(path, ema_path, config, model, ema, optimizer, step, *args)

    monkeypatch.setattr(trainer, "save_run", save_run)
    before = signal.signal(signal.SIGTERM, lambda *a: met.append("the handler from before"))
    try:
        with pytest.raises(SystemExit) as e:
            run(train_mnist, tmp_path, "--steps", "3")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert met == [] and e.value.code == 143
    assert step_of(tmp_path / "ckpt" / "mnist.pt") == 3 and step_of(tmp_path / "ckpt" / "mnist_ema.pt") == 3


def test_resume_without_a_checkpoint_names_the_flags_that_exist(data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path, "--steps", "2", "--resume")
    message = str(e.value)
    assert message.startswith("error: --resume: there is no") and "--ckpt-dir" in message and "--run-name" in message
    assert "--ckpt " not in message and not (tmp_path / "ckpt").exists()


def test_generate_says_what_the_model_has_seen_and_warns_before_sampling_noise(data_dir, tmp_path, capsys):
    import generate
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "2", "--limit-data", "64")        # 16 of 64 images seen
    capsys.readouterr()
    generate.main(["--ckpt", str(ckpt_dir / "mnist_ema.pt"), "--n", "2", "--steps", "2", "--device", "cpu",
                   "--grid", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert "checkpoint: trained 2 steps, 16 images" in out and "PFLOP" in out
    assert "less than one pass over its 64 training images" in out and "noise" in out
    assert "s to sample 2 images" in out
    assert out.index("s to sample") < out.index("sampled 2 images")            # said before sampling
