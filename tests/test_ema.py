"""ema.py: θ_ema ← d·θ_ema + (1 − d)·θ, the warmup decay, buffers copied, state round trips."""

import pytest
import torch
import torch.nn as nn

from ema import EMA



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
