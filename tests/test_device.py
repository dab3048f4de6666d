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


@pytest.mark.parametrize("name, message", [
    ("foo", "not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("meta", "this repo runs on cpu, cuda or mps"),
    ("mps:0", "Apple MPS is not available here"),
    ("cuda:1", "this machine has 1 CUDA device(s), cuda:0 … cuda:0"),
])
def test_a_device_that_is_not_one_or_not_there_is_one_line(monkeypatch, name, message):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # one GPU, for the cuda:1 case
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        device.pick_device(name)
    assert e.value.code.startswith(f"error: --device {name}: {message}")


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


def test_time_call_leaves_the_slow_first_call_out_of_the_estimate(monkeypatch):
    """The first call at a shape pays allocation and kernel choice; an estimate that timed it came out
    about twice the real sampling time. time_call warms up first, then keeps the best timed call.
    The calls advance a fake clock by their durations, so no real time is measured."""
    clock = {"t": 100.0}
    monkeypatch.setattr(device.time, "perf_counter", lambda: clock["t"])
    durations = iter([0.3, 0.02, 0.01, 0.05, 0.04])

    def call():
        clock["t"] += next(durations)

    assert device.time_call(call, torch.device("cpu")) == pytest.approx(0.01)     # not the first call's 0.3
    assert next(durations) == 0.04                                               # three timed calls, no more


# ----------------------------------------------------------------------------- each device's own path, on the CPU
# No CUDA card or Mac has run these paths here: the tests below hold the rules by monkeypatching the
# capability checks the code asks (docs/devices.md).

def emulated_bf16(including_emulation=True):
    """torch.cuda.is_bf16_supported on a V100 / T4 / RTX 20xx: bf16 only by emulation."""
    return including_emulation


@pytest.fixture
def autocast_asked(monkeypatch):
    """torch.autocast replaced by a record of what it was asked: (device type, dtype, enabled). The real
    one switches itself off (with a warning) for a device that is not there."""
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype=None, enabled=True: (device_type, dtype, enabled))


@pytest.mark.parametrize("card, bf16", [(emulated_bf16, False), (lambda including_emulation=True: True, True)])
def test_autocast_is_bf16_on_cuda_cards_with_bf16_tensor_cores_and_float32_on_older_ones(monkeypatch, autocast_asked,
                                                                                         card, bf16):
    """torch.cuda.is_bf16_supported() says yes on pre-Ampere cards too, where bf16 is emulated and
    slower than float32; those cards run float32 (not float16, which training would have to scale)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", card)
    cuda = torch.device("cuda")
    assert device.bf16_fast(cuda) is bf16
    assert device.autocast(cuda) == ("cuda", torch.bfloat16, bf16)
    assert device.autocast(cuda, enabled=False) == ("cuda", torch.bfloat16, False)          # --no-amp


def test_autocast_on_apple_mps_is_off_float32(monkeypatch, autocast_asked):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)   # not asked
    mps = torch.device("mps")
    assert device.bf16_fast(mps) is False
    assert device.autocast(mps) == ("mps", torch.bfloat16, False)


@pytest.mark.parametrize("native", [False, True])
def test_autocast_on_the_cpu_is_bf16_only_with_native_bf16_instructions(monkeypatch, autocast_asked, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    cpu = torch.device("cpu")
    assert device.bf16_fast(cpu) is native
    assert device.autocast(cpu) == ("cpu", torch.bfloat16, native)


def test_a_model_loaded_for_sampling_runs_float32_where_bf16_is_not_fast(monkeypatch, tiny_checkpoint):
    """generate.py, fid.py and the demo: diffusion.amp (bf16 autocast in GaussianDiffusion.network)
    follows bf16_fast for the device asked, and --no-amp turns it off anywhere."""
    from plumbing.checkpoint import load_for_sampling
    path = tiny_checkpoint()
    for fast in (False, True):
        monkeypatch.setattr(device, "bf16_fast", lambda d: fast)
        monkeypatch.setattr("plumbing.checkpoint.bf16_fast", lambda d: fast)
        assert load_for_sampling(path, "cpu")[0].amp is fast
        assert load_for_sampling(path, "cpu", amp=False)[0].amp is False


@pytest.mark.parametrize("name, cuda, expected", [
    ("auto", True, ("nccl", "cuda")), ("cuda", True, ("nccl", "cuda")), ("cuda:1", True, ("nccl", "cuda")),
    ("auto", False, ("gloo", "cpu")), ("cpu", True, ("gloo", "cpu")), ("cpu", False, ("gloo", "cpu"))])
def test_ddp_uses_nccl_on_cuda_and_gloo_on_the_cpu(monkeypatch, name, cuda, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    assert device.ddp_backend(name) == expected


def test_ddp_refuses_apple_mps_and_a_missing_cuda_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        device.ddp_backend("mps")
    assert e.value.code.startswith("error: --device mps under torchrun: PyTorch's DDP has no backend for Apple MPS")
    with pytest.raises(SystemExit) as e:
        device.ddp_backend("cuda")
    assert e.value.code == "error: --device cuda: CUDA is not available here; use --device auto or cpu"


@pytest.mark.parametrize("name, backend, expected", [("cuda", "nccl", torch.device("cuda", 3)),
                                                     ("cpu", "gloo", torch.device("cpu"))])
def test_setup_distributed_starts_the_backend_and_takes_local_ranks_gpu(monkeypatch, name, backend, expected):
    """Under torchrun (RANK set): one process per GPU, the GPU LOCAL_RANK's."""
    from argparse import Namespace
    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(device.dist, "init_process_group", lambda b: calls.append(("init", b)))
    monkeypatch.setattr(device.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(device.dist, "get_world_size", lambda: 4)
    assert device.setup_distributed(Namespace(device=name)) == (expected, 3, 4)
    assert calls == [("init", backend)] + ([("set_device", 3)] if backend == "nccl" else [])


def test_the_checkpoints_rng_state_holds_the_mps_generator_on_a_mac(monkeypatch):
    """On MPS, training draws t, ε and dropout from the MPS generator: a resume restores it too."""
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: restored.append(s))
    state = device.rng_state(torch.device("mps"))
    assert state.keys() == {"torch", "mps"} and state["mps"].tolist() == [7]
    device.set_rng_state(state, torch.device("mps"))
    assert restored == [state["mps"]]
    assert device.rng_state(torch.device("cpu")).keys() == {"torch"}


@pytest.mark.parametrize("name, waits", [("cuda", ["cuda"]), ("mps", ["mps"]), ("cpu", [])])
def test_synchronize_waits_for_the_devices_queue_and_not_on_the_cpu(monkeypatch, name, waits):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waited.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    device.synchronize(torch.device(name))
    assert waited == waits


def test_fused_adamw_skips_its_update_where_found_inf_is_set():
    """The CUDA step never waits for the host: a non-finite gradient reaches fused AdamW as found_inf
    (trainer.apply_step), which only fused optimisers honour. --debug-sync-free runs this path on the CPU."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))                          # skipped
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert (p.detach() < 1).all()                                          # taken


@pytest.mark.parametrize("sampler, settings", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("edm", {})])
def test_sampling_noise_comes_from_the_cpu_generator_not_the_devices_rng(sampler, settings):
    """The same --seed gives the same images on every device: every z is drawn from the CPU generator
    and moved, so the device's own RNG (which differs between CUDA, MPS and the CPU) is never asked."""
    from conftest import WavyEps, make_diffusion
    diffusion = make_diffusion(WavyEps(), timesteps=20, image_size=4)
    before = torch.get_rng_state()
    a = diffusion.sample(2, sampler=sampler, steps=6, progress=False, generator=torch.Generator().manual_seed(0),
                         **settings)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)
    b = diffusion.sample(2, sampler=sampler, steps=6, progress=False, generator=torch.Generator().manual_seed(0),
                         **settings)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())
    diffusion.sample(2, sampler=sampler, steps=6, progress=False, **settings)          # no generator: the device's RNG
    assert not torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())
