"""--init-from: a new run whose weights start from a finished run's EMA weights (how a campaign whose
lr has run out goes on), and its refusals.

Every run is a tiny model (conftest.TINY) for a step or two on a slice of the real data.
"""

import pytest
import torch

import train_mnist
from conftest import run


def test_a_new_run_starts_from_the_ema_weights_with_its_own_optimiser_and_counters(data_dir, tmp_path, capsys):
    source = run(train_mnist, tmp_path / "first", "--steps", "3", "--lr", "1e-2", "--ema-decay", "0.5")
    ema = torch.load(source / "mnist_ema.pt", weights_only=True)
    raw = torch.load(source / "mnist.pt", weights_only=True)["model"]
    assert any((raw[k] - v).abs().max() > 1e-4 for k, v in ema["ema_model"].items())   # EMA ≠ θ: a real choice
    capsys.readouterr()
    # lr 1e-12: one AdamW step moves each weight by about 1e-12, so θ after it is the start, to print precision.
    second = run(train_mnist, tmp_path / "second", "--steps", "1", "--lr", "1e-12",
                 "--init-from", str(source / "mnist_ema.pt"))
    said = capsys.readouterr().out
    assert f"weights from {source / 'mnist_ema.pt'} (its EMA: step 3" in said
    new = torch.load(second / "mnist.pt", weights_only=True)
    for k, v in ema["ema_model"].items():
        assert torch.allclose(new["model"][k], v, atol=1e-8), k                        # θ₀ = the source's EMA
        assert torch.allclose(new["ema"]["shadow"][k], v, atol=1e-8), k                # and so is θ_ema
    assert new["step"] == 1 and new["images_seen"] == 8                              # its own counters
    assert new["optimizer"]["state"][0]["step"] == 1                                 # a fresh AdamW
    assert new["config"]["train"]["init_from"] == str(source / "mnist_ema.pt")


def test_a_resumed_init_from_run_keeps_its_weights(data_dir, tmp_path):
    """--resume takes init_from back from the checkpoint but must not load the source again."""
    source = run(train_mnist, tmp_path / "first", "--steps", "2")
    second = run(train_mnist, tmp_path / "second", "--steps", "2", "--lr", "1e-2",
                 "--init-from", str(source / "mnist_ema.pt"))
    before = torch.load(second / "mnist.pt", weights_only=True)["model"]
    run(train_mnist, tmp_path / "second", "--steps", "3", "--resume", "--lr", "1e-12")
    after = torch.load(second / "mnist.pt", weights_only=True)
    assert after["step"] == 3
    for k, v in before.items():
        assert torch.allclose(after["model"][k], v, atol=1e-8), k


@pytest.mark.parametrize("flags, message", [
    (["--base-channels", "16"], "is another model (base_channels 8 there, 16 here)"),
    (["--objective", "eps"], "objective 'v' there, 'eps' here"),
])
def test_another_model_is_refused_in_one_line_and_leaves_nothing(data_dir, tmp_path, flags, message):
    source = run(train_mnist, tmp_path / "first", "--steps", "1")
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path / "second", "--steps", "1", "--init-from", str(source / "mnist_ema.pt"), *flags)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "second" / "ckpt").exists()                             # no lock, no folder


def test_a_missing_source_and_resume_with_init_from_are_refused(data_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path, "--steps", "1", "--init-from", str(tmp_path / "nothing.pt"))
    assert "--init-from: checkpoint" in str(e.value) and "does not exist" in str(e.value)
    assert not (tmp_path / "ckpt").exists()
    source = run(train_mnist, tmp_path / "first", "--steps", "1")
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path / "first", "--steps", "2", "--resume", "--init-from", str(source / "mnist_ema.pt"))
    assert "--init-from starts a new run and --resume continues" in str(e.value)


def test_a_chain_of_runs_keeps_what_its_weights_cost(data_dir, tmp_path, capsys):
    """Each --init-from run records what its starting weights had seen ("before", its source's own
    counters plus the source's "before"), keeps it on --resume, and hands it on to the shipped file,
    generate's "checkpoint:" line and the demo's step count."""
    import generate
    from tools import ship

    first = run(train_mnist, tmp_path / "first", "--steps", "3")
    a = torch.load(first / "mnist_ema.pt", weights_only=True)
    assert "before" not in a                                                          # a run from noise
    second = run(train_mnist, tmp_path / "second", "--steps", "2", "--init-from", str(first / "mnist_ema.pt"))
    run(train_mnist, tmp_path / "second", "--steps", "4", "--resume")
    b = torch.load(second / "mnist_ema.pt", weights_only=True)
    assert b["step"] == 4 and b["before"]["step"] == 3                               # kept across --resume
    assert b["before"]["images_seen"] == a["images_seen"] and b["before"]["train_flops"] == a["train_flops"]
    third = run(train_mnist, tmp_path / "third", "--steps", "1", "--init-from", str(second / "mnist_ema.pt"))
    c = torch.load(third / "mnist.pt", weights_only=True)
    assert c["before"]["step"] == 3 + 4                                               # the whole chain
    assert c["before"]["images_seen"] == a["images_seen"] + b["images_seen"]
    assert c["before"]["train_seconds"] == pytest.approx(a["train_seconds"] + b["train_seconds"])

    shipped = tmp_path / "shipped.pt"
    ship.main([str(third / "mnist_ema.pt"), str(shipped)])
    assert torch.load(shipped, weights_only=True)["before"] == c["before"]
    capsys.readouterr()
    generate.main(["--ckpt", str(shipped), "--n", "1", "--steps", "2", "--grid", str(tmp_path / "g.png")])
    said = capsys.readouterr().out
    assert "checkpoint: trained 1 steps" in said and "from weights that had seen 7 steps" in said
    assert f"{8 * 8:,} images" in said                                                # 8 steps × batch 8 in all
