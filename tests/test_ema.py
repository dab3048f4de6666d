"""ema.py: θ_ema ← d·θ_ema + (1 − d)·θ, the warmup decay, buffers copied, state round trips; and the
trainer's --ema-extra-decays: several EMA lengths kept at once, each as the main one would be."""

from argparse import Namespace

import pytest
import torch
import torch.nn as nn

import train_mnist
from conftest import run, tensors_equal
from ema import EMA, warmup_reaches
from trainer import note_identical_emas
from plumbing.checkpoint import load_for_sampling


class Toy(nn.Module):
    """Two parameters, a float buffer, BatchNorm running statistics and an integer counter."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x):
        return self.bn(self.linear(x)) * self.scale


def set_params(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_after_k_updates_equals_closed_form():
    # θ_ema,k = d^k·θ_0 + Σ_{j=1..k} (1 − d)·d^{k−j}·θ_j, for parameters θ_j set before update j.
    d, k = 0.9, 7
    model = Toy()
    set_params(model, 1.0)
    ema = EMA(model, decay=d)
    values = [float(j) ** 2 for j in range(1, k + 1)]                # θ_j = j²
    for value in values:
        set_params(model, value)
        ema.update(model)
    expected = d ** k * 1.0 + sum((1 - d) * d ** (k - j) * v for j, v in enumerate(values, start=1))
    for name, _ in model.named_parameters():
        assert torch.allclose(ema.shadow[name], torch.full_like(ema.shadow[name], expected), rtol=1e-6), name
    assert ema.num_updates == k


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.999, 0.9995, 0.9998, 0.9999])
def test_warmup_reaches_is_the_first_update_at_the_full_decay(decay):
    ema = EMA(Toy(), decay=decay, warmup=True)
    ema.num_updates = warmup_reaches(decay)
    assert ema.current_decay() == decay
    ema.num_updates -= 1
    assert ema.current_decay() < decay


def test_decays_warmup_never_reaches_average_identically_and_the_trainer_says_so_before_training():
    # Trial D kept 0.999, 0.9995 and 0.9998 over 3,229 steps: three identical files.
    model = Toy()
    emas = [EMA(model, decay=d, warmup=True) for d in (0.999, 0.9995)]
    for j in range(1, 30):
        set_params(model, float(j) ** 0.5)
        for ema in emas:
            ema.update(model)
    tensors_equal(emas[0].shadow, emas[1].shadow, "shadow")             # asserts each tensor equal
    said = []
    args = Namespace(ema_decay=0.999, ema_extra_decays=[0.9995, 0.9998], ema_warmup=True)
    note_identical_emas(args, 3229, said.append)
    assert len(said) == 1 and "0.999, 0.9995, 0.9998" in said[0] and "8,990, 17,990, 44,990" in said[0], said
    for last_step, warmup, extra in ((3229, False, [0.9995, 0.9998]),     # no warmup: the decays differ
                                     (50_000, True, [0.9995, 0.9998]),    # all reached before the end
                                     (3229, True, [0.99])):               # 0.99 reached at 890: one held
        said.clear()
        note_identical_emas(Namespace(ema_decay=0.999, ema_extra_decays=extra, ema_warmup=warmup), last_step,
                            said.append)
        assert said == [], (last_step, warmup, extra)


def test_ema_of_a_constant_model_converges_as_one_minus_d_to_the_k():
    # θ fixed: θ_ema,k − θ = d^k·(θ_ema,0 − θ)
    d = 0.5
    model = Toy()
    set_params(model, 0.0)
    ema = EMA(model, decay=d)
    set_params(model, 2.0)
    for k in range(1, 6):
        ema.update(model)
        assert ema.shadow["linear.weight"].sub(2.0).abs().max().item() == pytest.approx(2.0 * d ** k, rel=1e-6)


def test_warmup_decay_is_min_decay_1_plus_n_over_10_plus_n():
    model = Toy()
    set_params(model, 0.0)
    ema = EMA(model, decay=0.999, warmup=True)
    shadow = 0.0
    for n in range(30):
        d = min(0.999, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d, rel=1e-12), n
        set_params(model, float(n + 1))
        ema.update(model)
        shadow = d * shadow + (1 - d) * (n + 1)                        # each update uses d_n with n before it
        assert ema.shadow["linear.bias"][0].item() == pytest.approx(shadow, rel=1e-5), n
    ema.num_updates = 100_000
    assert ema.current_decay() == 0.999                                  # capped at decay
    assert EMA(model, decay=0.9).current_decay() == 0.9                 # no warmup: constant


def test_ema_copies_buffers_instead_of_averaging():
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(model, decay=0.99)
    model.train()
    model(torch.randn(16, 3) * 5 + 3)                                   # moves BatchNorm's running stats
    model.scale.fill_(7.0)
    ema.update(model)
    for name, value in model.named_buffers():
        assert torch.equal(ema.shadow[name].to(value.dtype), value), name
    assert ema.shadow["bn.num_batches_tracked"].dtype == torch.long
    assert ema.shadow["bn.num_batches_tracked"].item() == 1
    # while parameters move only (1 − d) of the way
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    before = ema.shadow["linear.weight"].clone()
    ema.update(model)
    assert torch.allclose(ema.shadow["linear.weight"], 0.99 * before + 0.01 * model.linear.weight, atol=1e-6)


def test_ema_state_dict_round_trip():
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(model, decay=0.8, warmup=True)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
    state = ema.state_dict()
    assert all(v.data_ptr() != ema.shadow[k].data_ptr() for k, v in state["shadow"].items())   # a copy

    assert set(state) == {"shadow", "num_updates"}          # only what changes; decay and warmup are settings
    restored = EMA(Toy(), decay=0.8, warmup=True)
    restored.load_state_dict(state)
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.8, True, 5)
    other = EMA(Toy(), decay=0.5)
    other.load_state_dict(state)
    assert (other.decay, other.warmup) == (0.5, False)       # the constructor's settings stay
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value), name
    # and the two continue identically
    ema.update(model)
    restored.update(model)
    for name, value in ema.shadow.items():
        assert torch.equal(restored.shadow[name], value), name

    bad = {**state, "shadow": {k: v for k, v in state["shadow"].items() if k != "bn.running_mean"}}
    with pytest.raises(KeyError):
        EMA(Toy()).load_state_dict(bad)


def test_ema_state_dict_survives_torch_save_weights_only(tmp_path):
    model = Toy()
    ema = EMA(model, decay=0.9)
    set_params(model, 3.0)
    ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    restored = EMA(Toy(), decay=0.9)
    restored.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert restored.num_updates == 1
    assert torch.equal(restored.shadow["linear.bias"], ema.shadow["linear.bias"])


def test_copy_to_writes_the_averaged_weights_into_a_model():
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(model, decay=0.75)
    set_params(model, 4.0)
    ema.update(model)
    target = Toy()
    ema.copy_to(target)
    for name, value in target.state_dict().items():
        assert torch.equal(value, ema.shadow[name].to(value.dtype)), name
    # 0.75·θ_0 + 0.25·4 for the weights the EMA started from
    torch.manual_seed(0)
    start_model = Toy()
    assert torch.allclose(target.linear.weight, 0.75 * start_model.linear.weight + 1.0, atol=1e-6)
    # the model is usable: same forward as a model built from the shadow
    target.eval()
    assert target(torch.randn(4, 3)).shape == (4, 2)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_decay_outside_zero_to_one_is_refused_as_the_trainers_refuse_it(decay):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA(torch.nn.Linear(2, 2), decay)


# ----------------------------------------------------------------------------- --ema-extra-decays

def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("sync_free", [[], ["--debug-sync-free"]], ids=["host-skip", "keep-on-device"])
def test_each_extra_decay_equals_the_main_ema_of_a_run_trained_with_that_decay(data_dir, tmp_path, sync_free):
    # The weights θ_1..θ_n do not depend on any EMA, so the extra d = 0.2 of a run whose main decay is 0.999
    # must be, bit for bit, the main EMA of the same run trained with --ema-decay 0.2: same warmup
    # (train_mnist's --ema-warmup: d_n = min(d, (1+n)/(10+n)) = 0.1, 0.18, 0.2, 0.2 here), same skipped
    # step (step 2 is non-finite: no update, on either path).
    common = ["--steps", "5", "--debug-nan-steps", "2", *sync_free]
    extra = run(train_mnist, tmp_path / "extra", *common, "--ema-decay", "0.999", "--ema-extra-decays", "0.2,0.05")
    plain = run(train_mnist, tmp_path / "plain", *common, "--ema-decay", "0.2")
    assert {p.name for p in extra.glob("*.pt")} == {"mnist.pt", "mnist_ema.pt", "mnist_ema0.2.pt", "mnist_ema0.05.pt"}
    full, main, d02, d005 = (load(extra / f) for f in ("mnist.pt", "mnist_ema.pt", "mnist_ema0.2.pt", "mnist_ema0.05.pt"))
    plain_full, plain_main = load(plain / "mnist.pt"), load(plain / "mnist_ema.pt")
    assert full["nan_skipped"] == 1
    tensors_equal(full["model"], plain_full["model"], "θ")
    tensors_equal(d02["ema_model"], plain_main["ema_model"], "θ_ema with d = 0.2")
    tensors_equal(full["ema_extra"]["0.2"], plain_full["ema"], "the resume state of d = 0.2")
    assert full["ema_extra"]["0.2"]["num_updates"] == full["ema"]["num_updates"] == 5 - (not sync_free)
    # each file says which decay it holds, and the others of its run (the main one first)
    assert (main["config"]["train"]["ema_decay"], d02["config"]["train"]["ema_decay"],
            d005["config"]["train"]["ema_decay"]) == (0.999, 0.2, 0.05)
    assert d005["config"]["train"]["ema_extra_decays"] == [0.999, 0.2]
    assert d02["step"] == main["step"] == 5 and d02["train_flops"] == main["train_flops"]
    # three different averages of the same weights
    name = "conv_in.weight"
    assert not torch.equal(main["ema_model"][name], d02["ema_model"][name])
    assert not torch.equal(d005["ema_model"][name], d02["ema_model"][name])
    assert not torch.equal(d005["ema_model"][name], main["ema_model"][name])
    diffusion, config = load_for_sampling(extra / "mnist_ema0.05.pt")      # as generate.py / fid.py open it
    assert torch.equal(diffusion.model.state_dict()[name], d005["ema_model"][name])


def test_without_extra_decays_a_run_writes_what_it_wrote_before(data_dir, tmp_path):
    # the extras leave θ and the main EMA alone, and without them no file, key or config entry is added
    plain = run(train_mnist, tmp_path / "plain", "--steps", "3", "--ema-decay", "0.999")
    extra = run(train_mnist, tmp_path / "extra", "--steps", "3", "--ema-decay", "0.999", "--ema-extra-decays", "0.9")
    assert {p.name for p in plain.glob("*.pt")} == {"mnist.pt", "mnist_ema.pt"}
    full, main = load(plain / "mnist.pt"), load(plain / "mnist_ema.pt")
    assert "ema_extra" not in full and "ema_extra_decays" not in full["config"]["train"]
    assert set(main) == {"config", "ema_model", "step", "images_seen", "flops_per_image", "train_flops", "train_seconds"}
    extra_full, extra_main = load(extra / "mnist.pt"), load(extra / "mnist_ema.pt")
    assert set(extra_full) - set(full) == {"ema_extra"} and set(extra_main) == set(main)
    tensors_equal(extra_full["model"], full["model"], "θ")
    tensors_equal(extra_full["ema"], full["ema"], "the main EMA")
    tensors_equal(extra_main["ema_model"], main["ema_model"], "<run>_ema.pt")


def test_resume_continues_each_extra_ema_bit_for_bit(data_dir, tmp_path):
    common = ["--lr-schedule", "constant", "--ema-extra-decays", "0.15,0.25"]     # both reached in the warmup
    whole = run(train_mnist, tmp_path / "whole", "--steps", "4", *common)
    split = run(train_mnist, tmp_path / "split", "--steps", "2", *common)
    run(train_mnist, tmp_path / "split", "--steps", "4", "--resume")        # the extras come from the checkpoint
    a, b = load(whole / "mnist.pt"), load(split / "mnist.pt")
    assert set(a["ema_extra"]) == {"0.15", "0.25"} and a["ema_extra"]["0.15"]["num_updates"] == 4
    tensors_equal(a["ema_extra"], b["ema_extra"], "ema_extra")
    assert not torch.equal(a["ema_extra"]["0.15"]["shadow"]["conv_in.weight"], a["ema_extra"]["0.25"]["shadow"]["conv_in.weight"])
    for name in ("mnist_ema0.15.pt", "mnist_ema0.25.pt"):
        tensors_equal(load(whole / name)["ema_model"], load(split / name)["ema_model"], name)


def test_resume_with_another_set_starts_the_new_decay_from_the_current_weights(data_dir, tmp_path, capsys):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "1", "--ema-extra-decays", "0.9")
    first = load(ckpt_dir / "mnist.pt")
    run(train_mnist, tmp_path, "--steps", "2", "--resume", "--ema-extra-decays", "0.99")
    assert "--ema-extra-decays: 0.99 start(s) now, at step 1, from the current weights; 0.9 no longer kept" \
        in capsys.readouterr().out
    second = load(ckpt_dir / "mnist.pt")
    assert set(second["ema_extra"]) == {"0.99"} and second["ema_extra"]["0.99"]["num_updates"] == 1
    # θ_ema,0 = θ_1 (the weights at the resume), then one warmup update d_0 = min(0.99, 1/10)
    name = "conv_in.weight"
    expected = 0.1 * first["model"][name] + 0.9 * second["model"][name]
    assert torch.allclose(second["ema_extra"]["0.99"]["shadow"][name], expected, atol=1e-6)
    assert load(ckpt_dir / "mnist_ema0.9.pt")["step"] == 1                  # the dropped one stays as it was


def test_overwrite_removes_the_earlier_runs_extra_ema_files_it_does_not_keep(data_dir, tmp_path, capsys):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "1", "--ema-extra-decays", "0.9,0.99")
    (ckpt_dir / "other_ema0.9.pt").write_bytes(b"another run's file")             # not this run's: kept
    capsys.readouterr()
    run(train_mnist, tmp_path, "--steps", "1", "--overwrite", "--ema-extra-decays", "0.99")
    assert "--overwrite: removed the earlier run's mnist_ema0.9.pt" in capsys.readouterr().out
    assert not (ckpt_dir / "mnist_ema0.9.pt").exists() and (ckpt_dir / "other_ema0.9.pt").exists()
    assert load(ckpt_dir / "mnist_ema0.99.pt")["step"] == 1 and (ckpt_dir / "mnist_ema.pt").exists()


def test_an_overwrite_refused_before_its_first_save_removes_nothing(data_dir, tmp_path):
    ckpt_dir = run(train_mnist, tmp_path, "--steps", "1", "--ema-extra-decays", "0.9")
    with pytest.raises(SystemExit, match="--init-from"):
        run(train_mnist, tmp_path, "--steps", "1", "--overwrite", "--init-from", str(tmp_path / "typo.pt"))
    assert load(ckpt_dir / "mnist_ema0.9.pt")["step"] == 1          # still there: the new run never saved


@pytest.mark.parametrize("flags, message", [
    (["--ema-extra-decays", "1"], "out of range: use a number in [0, 1)"),
    (["--ema-extra-decays", "0.9,1.5"], "out of range: use a number in [0, 1)"),
    (["--ema-extra-decays", "-0.1"], "out of range: use a number in [0, 1)"),
    (["--ema-extra-decays", "0.9,abc"], "expected a number in [0, 1), got 'abc'"),
    (["--ema-extra-decays", "0.99,0.990"], "a decay is given twice"),
    (["--ema-decay", "0.999", "--ema-extra-decays", "0.99,0.999"], "holds 0.999, the main --ema-decay"),
])
def test_bad_extra_decays_are_refused_in_one_line_before_any_work(data_dir, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run(train_mnist, tmp_path, "--steps", "1", *flags)
    said = f"{e.value.code}\n{capsys.readouterr().err}"
    assert message in said and e.value.code != 0
    assert [line for line in said.splitlines() if "error" in line and message in line]      # one line says it
    assert not (tmp_path / "ckpt").exists()                                                 # before any work
