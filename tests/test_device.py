"""device.py: a device that is not there is refused in one line, with the project's `error:` prefix."""

import pytest
import torch

from plumbing import device


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_an_error_line_saying_what_to_use(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        device.pick_device(name)
    assert e.value.code == f"error: --device {name}: CUDA is not available here; use --device auto or cpu"


def test_mps_without_mps_is_an_error_line_saying_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        device.pick_device("mps")
    assert e.value.code == "error: --device mps: Apple MPS is not available here; use --device auto or cpu"


def test_a_trainer_refuses_a_missing_device_before_writing_anything(monkeypatch, tmp_path):
    import train_mnist
    from conftest import run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path / "out", "--device", "cuda")
    assert e.value.code == "error: --device cuda: CUDA is not available here; use --device auto or cpu"
    assert list((tmp_path / "out").iterdir()) == []           # no ckpt/, runs/ or samples/, no lock file


def test_cpu_and_auto_are_always_there():
    assert device.pick_device("cpu") == torch.device("cpu")
    assert device.pick_device("auto").type in ("cuda", "mps", "cpu")


def test_time_call_leaves_the_slow_first_call_out_of_the_estimate():
    """The first call at a shape pays allocation and kernel choice; an estimate that timed it came out
    about twice the real sampling time. time_call warms up first, then keeps the best timed call."""
    import time
    delays = iter([0.3] + [0.01] * 10)
    seconds = device.time_call(lambda: time.sleep(next(delays)), torch.device("cpu"))
    assert 0.01 <= seconds < 0.1
