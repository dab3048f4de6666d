"""The device rules, held on a CPU-only machine: nothing float64 reaches the model's device.

Apple MPS has no float64 at all (`.to("mps")` of a float64 tensor raises a TypeError) and CUDA runs it
at a small fraction of float32's speed. float64 belongs on the host: the schedules are computed there
once and cast to float32; the σ ↔ t lookups of the samplers are host scalar arithmetic.

Here the model's device and the host are one and the same CPU, so the test tells them apart the way
the code names them. Every script gets its device from pick_device, a torch.device object; the host
is what a tensor is born on without a device, or what `.cpu()` and `.to("cpu")` bring back.
    device tensors  created with device=<a torch.device> (noise drawn from a CPU generator excepted),
                    moved with .to(<a torch.device or a tensor>) (Module.to moves every parameter and
                    buffer so), and everything computed from one
    host tensors    the rest
Watched (DeviceRules, a TorchFunctionMode for the names plus a TorchDispatchMode that follows every
operation, the backward pass's too), three things are refused:
    born    a float64 tensor created with a torch.device as its device
    moved   a float64 tensor moved with .to(<a torch.device or a tensor>)
    mixed   an operation that reads a device tensor and reads or writes float64: float64 computed
            from the device's tensors, or host float64 brought into their arithmetic
Before the rules held, diffusion.py moved a float64 buffer with the model (sigma_levels: "moved"),
drew the log-normal training steps as torch.randn(n, device=device, dtype=torch.float64) ("born")
and looked them up in that buffer ("mixed"); DPM-Solver++(2M) took alphas_cumprod.double() of the
device's buffer, and fid.py's feature extractors .double() of the device's features ("mixed").
Each of these fails here.
"""

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from conftest import WavyEps, make_checkpoint, make_diffusion, run
from samplers import Guidance

DEVICE = torch.device("cpu")      # the model's device, as pick_device names it


def tensors(tree):
    return [a for a in tree_flatten(tree)[0] if isinstance(a, torch.Tensor)]


def names_a_device(value):
    """A device argument that names the model's device: a torch.device or a tensor, not the string "cpu"."""
    return isinstance(value, (torch.device, torch.Tensor)) or (isinstance(value, str) and value != "cpu")


def drawn_on_host(generator):
    """Noise drawn from a CPU torch.Generator is host noise (sample_images's seeded z, then moved)."""
    return generator is not None and generator.device.type == "cpu"


class DeviceRules:
    """with DeviceRules() as rules: ... ; rules.broken lists every break of the three rules, once each."""

    def __init__(self):
        self.on_device = WeakIdKeyDictionary()
        self.broken = []
        rules = self

        class Names(TorchFunctionMode):                   # what the code says: device=…, .to(…), .cpu()
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                name = getattr(func, "__name__", str(func))
                if name == "cpu" or (name == "to" and any(isinstance(a, str) and a == "cpu" for a in (*args[1:], kwargs.get("device")))):
                    host = out.view_as(out)                # on the CPU .cpu() returns the tensor itself: a fresh alias
                    rules.on_device.pop(host, None)        # stands for the host copy it makes elsewhere
                    return host
                if name == "to" and any(names_a_device(a) for a in (*args[1:], kwargs.get("device"), kwargs.get("other"))):
                    rules.mark(out, "moved", f".to({', '.join(map(str, args[1:]))}) of {tuple(args[0].shape)}")
                elif names_a_device(kwargs.get("device")) and not drawn_on_host(kwargs.get("generator")):
                    rules.mark(out, "born", f"{name}(…, device={kwargs['device']})")
                return out

        class Follows(TorchDispatchMode):                 # every operation, forward and backward
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                ins, outs = tensors((args, kwargs)), tensors(out)
                if any(a in rules.on_device for a in ins):
                    if any(a.dtype == torch.float64 for a in ins + outs):
                        rules.break_("mixed", f"{func} on a device tensor with float64 "
                                              f"{[str(a.dtype) for a in ins]} -> {[str(a.dtype) for a in outs]}")
                    for a in outs:
                        rules.on_device[a] = True
                return out

        self.modes = [Names(), Follows()]

    def mark(self, out, rule, what):
        for a in tensors(out):
            self.on_device[a] = True
            if a.dtype == torch.float64:
                self.break_(rule, f"float64 {what}")

    def break_(self, rule, what):
        if (rule, what) not in self.broken:
            self.broken.append((rule, what))

    def __enter__(self):
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


# ----------------------------------------------------------------------------- the watch itself

def test_the_watch_sees_float64_born_moved_or_mixed_on_the_device_and_leaves_the_host_alone():
    """The rules catch each way in, and pass host float64 work that never meets the device."""
    def broken(work):
        with DeviceRules() as rules:
            work()
        return sorted({rule for rule, _ in rules.broken})

    table = torch.linspace(0, 1, 10, dtype=torch.float64)                     # a host schedule
    x = torch.randn(4).to(DEVICE)                                              # a device tensor
    assert broken(lambda: torch.randn(3, device=DEVICE, dtype=torch.float64)) == ["born"]
    assert broken(lambda: table.to(DEVICE)) == ["moved"]
    assert broken(lambda: torch.nn.Linear(2, 2).double().to(DEVICE)) == ["moved"]       # weight and bias
    assert broken(lambda: (x.to(DEVICE) * 2).double()) == ["mixed"]            # float64 of a device tensor
    assert broken(lambda: torch.searchsorted(table, x.to(DEVICE))) == ["mixed"]  # host float64 meets it
    assert broken(lambda: table.to(DEVICE).float()) == ["mixed", "moved"]      # moved first, cast after: too late
    assert broken(lambda: (table[:4].sqrt() * 3).float().to(DEVICE) + x.to(DEVICE)) == []   # host, cast, moved
    assert broken(lambda: x.to(DEVICE).cpu().double().sum().item()) == []       # brought back, then float64
    assert broken(lambda: torch.randn(3, dtype=torch.float64, device="cpu").exp()) == []   # host by name
    assert broken(lambda: x.to(DEVICE) * table[3].item()) == []                 # a host scalar


# ----------------------------------------------------------------------------- what a script moves to its device

def preset_config(script, preset):
    """A train_<dataset>.py's config (its defaults, or a preset such as --cpu) at tiny width: the flags
    a run resolves, through the trainers' own mapping from flags to model."""
    import importlib

    from plumbing.checkpoint import model_settings
    from plumbing.train_args import parse_args

    module = importlib.import_module(script)
    argv = ["--base-channels", "8", "--timesteps", "50"] + ([f"--{preset}"] if preset else [])
    args, _ = parse_args(module.DEFAULTS, argv, getattr(module, "PRESETS", None))
    size, channels = {"train_mnist": (28, 1), "train_cifar": (32, 3), "train_celeba": (args.image_size, 3)}[script]
    num_classes = 10 if args.class_cond else None
    model, diffusion = model_settings(args, channels, size, num_classes)
    return {"model": model, "diffusion": diffusion}


PRESETS = [("train_mnist", None), ("train_cifar", None), ("train_cifar", "cpu"), ("train_cifar", "small"),
           ("train_celeba", None), ("train_celeba", "cpu")]


@pytest.mark.parametrize("script, preset", PRESETS)
def test_no_module_a_script_moves_to_its_device_holds_float64(script, preset):
    """GaussianDiffusion with its UNet (what the trainer, generate.py, fid.py and the demo move with
    .to(device)), the trainer's EMA copy of it and the EMA's shadow weights: float32 and integers only."""
    from ema import EMA
    from plumbing.checkpoint import build_diffusion

    config = preset_config(script, preset)
    diffusion = build_diffusion(config)
    ema_model = copy.deepcopy(diffusion.model)
    ema_diffusion = type(diffusion)(ema_model, **config["diffusion"])
    held = {f"diffusion.{k}": v for k, v in [*diffusion.named_parameters(), *diffusion.named_buffers()]}
    held |= {f"ema_diffusion.{k}": v for k, v in [*ema_diffusion.named_parameters(), *ema_diffusion.named_buffers()]}
    held |= {f"ema.shadow.{k}": v for k, v in EMA(diffusion.model, 0.999).shadow.items()}
    assert not [k for k, v in held.items() if v.dtype == torch.float64], "float64 moves with the model"
    with DeviceRules() as rules:
        diffusion.to(DEVICE)
        ema_diffusion.to(DEVICE)
    assert rules.broken == []


# ----------------------------------------------------------------------------- a training step, a sampling call

@pytest.mark.parametrize("t_sampling", ["uniform", "lognormal"])
@pytest.mark.parametrize("loss_weighting", ["simple", "min_snr"])
def test_a_training_loss_and_its_backward_keep_float64_off_the_device(t_sampling, loss_weighting):
    """GaussianDiffusion.loss (t and ε drawn, x_t, the network, the weighting) and its gradient, for
    both ways of drawing t, on a tiny UNet moved to the device."""
    config = preset_config("train_cifar", "cpu")
    config["diffusion"].update(t_sampling=t_sampling, loss_weighting=loss_weighting)
    from plumbing.checkpoint import build_diffusion

    torch.manual_seed(0)
    diffusion = build_diffusion(config)
    with DeviceRules() as rules:
        diffusion.to(DEVICE)
        x0 = (torch.rand(2, 3, 32, 32) * 2 - 1).to(DEVICE)
        labels = torch.tensor([1, 2]).to(DEVICE)
        diffusion.loss(x0, labels).backward()
    assert rules.broken == []


def test_a_training_run_keeps_float64_off_the_device(data_dir, tmp_path):
    """train_celeba.py --cpu (log-normal t, v-objective, the EMA, the end-of-run grid, the save), two
    TINY steps watched from the command line on: the data moved to the device, the model built and
    moved, train_step (DDPM Alg. 1 with AdamW and the EMA) and the grid sampled from the EMA model."""
    import train_celeba

    with DeviceRules() as rules:
        run(train_celeba, tmp_path, "--cpu", "--steps", "2", "--image-size", "16", "--dataset", "faces",
            "--base-channels", "8", "--channel-mults", "1,2", "--attn-resolutions", "8", "--sample-count", "4",
            "--sample-steps", "3")
    assert (tmp_path / "ckpt" / "celeba_ema.pt").exists()
    assert rules.broken == []


SAMPLERS = ["ddpm", "ddim", "edm", "dpmpp2m"]


@pytest.mark.parametrize("guidance", [0.0, 1.5])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_a_checkpoint_keeps_float64_off_the_device(tmp_path, sampler, guidance):
    """What generate.py, fid.py and the demo do: load_for_sampling onto the device, then sample_images
    (noise from a CPU generator, moved), with and without classifier-free guidance."""
    from plumbing.checkpoint import load_for_sampling
    from plumbing.sampling import sample_images

    make_checkpoint(tmp_path / "tiny_ema.pt", num_classes=3, objective="v")
    with DeviceRules() as rules:
        diffusion, _ = load_for_sampling(tmp_path / "tiny_ema.pt", DEVICE, amp=False)
        labels = torch.tensor([0, 1, 2])
        images, trajectory = sample_images(diffusion, 3, labels=labels, sampler=sampler, steps=6, guidance=guidance,
                                           progress=False, trajectory_every=2)
    assert images.shape == (3, 8, 8, 1) and trajectory
    assert rules.broken == []


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_with_a_guidance_interval_or_a_guide_keeps_float64_off_the_device(sampler):
    """The guidance rules (samplers.Guidance): an interval of noise levels looks σ_t up on the host;
    autoguidance runs a second model, moved to the device as well."""
    from samplers import Guidance

    guide = make_diffusion(WavyEps(), timesteps=20, image_size=4)
    diffusion = make_diffusion(WavyEps(), timesteps=20, image_size=4)
    with DeviceRules() as rules:
        diffusion.to(DEVICE)
        guide.to(DEVICE)
        for g in (Guidance(1.0, sigma_lo=0.3, sigma_hi=5.0), Guidance(0.5, guide=guide)):
            x = diffusion.sample(2, sampler=sampler, steps=6, guidance=g, progress=False,
                                 generator=torch.Generator().manual_seed(0))
            assert x.shape == (2, 1, 4, 4)
    assert rules.broken == []


# ----------------------------------------------------------------------------- the log-normal training draws in float32

@pytest.mark.parametrize("schedule, mean", [("cosine", -1.2), ("cosine", -0.5), ("linear", -1.2)])
def test_lognormal_steps_drawn_in_float32_land_within_one_step_of_the_float64_projection(monkeypatch, schedule, mean):
    """sample_t draws ln σ ~ N(P_mean, P_std²) in float32 on the device and takes the first step whose
    float32 σ_t reaches σ. Given the same normal draws, the float64 projection (float64 draws, the
    host's float64 σ table: the code before) gives the same step to all but a few in 10⁴ draws, and
    none more than one step away. (test_diffusion.py checks the drawn steps' median and spread.)"""
    from diffusion import P_STD

    n, T = 200_000, 1000
    process = make_diffusion(schedule=schedule, t_sampling="lognormal", lognormal_mean=mean)
    z = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))         # (n,) N(0, 1)

    def randn(*size, device=None, dtype=None):            # sample_t's own draw, replaced by z in its dtype
        assert size == (n,) and dtype in (None, torch.float32), "the draw is float32"
        return z.float().to(device)

    monkeypatch.setattr(torch, "randn", randn)
    t = process.sample_t(n, DEVICE)
    monkeypatch.undo()
    sigma = (mean + P_STD * z).exp()                                                          # float64 σ
    t_ref = torch.searchsorted(process.sigma_table, sigma).clamp(max=T - 1)                  # first σ_t ≥ σ
    assert t.dtype == torch.long and t.shape == (n,)
    assert (t - t_ref).abs().max().item() <= 1
    assert (t != t_ref).double().mean().item() < 1e-3


# ----------------------------------------------------------------------------- host ↔ device inside the sampling loop

class Transfers(DeviceRules):
    """DeviceRules that also count the copies between host and device: host tensors moved to the
    device (shape, dtype), and device tensors read back (.cpu(), .tolist(), .item(), .numpy())."""

    def __init__(self):
        super().__init__()
        self.to_device, self.to_host = [], []
        rules, names = self, self.modes[0]
        inner = type(names).__torch_function__

        class Counted(type(names)):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                source = args[0] if args and isinstance(args[0], torch.Tensor) else None
                was_on_device = source is not None and source in rules.on_device
                out = inner(self, func, types, args, kwargs)
                if name in ("cpu", "tolist", "item", "numpy") and was_on_device:
                    rules.to_host.append((name, tuple(source.shape)))
                elif name == "to" and source is not None and not was_on_device and isinstance(out, torch.Tensor) \
                        and out in rules.on_device:
                    rules.to_device.append((tuple(source.shape), out.dtype))
                return out

        self.modes[0] = Counted()


@pytest.mark.parametrize("interval", [False, True])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inside_the_sampling_loop_only_the_noise_goes_to_the_device_and_nothing_comes_back(sampler, interval):
    """Per network call, at most one host tensor is moved to the device: z ~ N(0, I) from the CPU
    generator (float32, the batch's shape), so that a seed gives the same images on every device; and
    nothing is read back, not even a scalar (σ ↔ t are host arithmetic, and a guidance interval is
    resolved from the host's σ_t: no synchronisation per step). Outside the loop: x_T, and for
    dpmpp2m the ᾱ table, read to the host once per call. Counted as the difference between 6 and 12
    network calls; with `interval`, autoguided (the model as its own guide) inside a band of σ."""
    diffusion = make_diffusion(WavyEps(), timesteps=50, image_size=4)
    lo, hi = diffusion.sigma_table[10].item(), diffusion.sigma_table[40].item()
    guidance = Guidance(1.0, sigma_lo=lo, sigma_hi=hi, guide=diffusion) if interval else 0.0
    counts = {}
    for steps in (6, 12):
        with Transfers() as rules:
            diffusion.to(DEVICE)
            rules.to_device.clear()                                  # the model's own move, before sampling
            diffusion.sample(2, sampler=sampler, steps=steps, guidance=guidance, progress=False,
                             generator=torch.Generator().manual_seed(0))
        assert rules.broken == []
        assert set(rules.to_device) <= {((2, 1, 4, 4), torch.float32)}
        counts[steps] = len(rules.to_device), len(rules.to_host)
    moved_per_call = (counts[12][0] - counts[6][0]) / 6
    assert moved_per_call <= 1                                   # the noise z, where the sampler adds noise
    assert counts[12][1] == counts[6][1] <= 1                    # nothing read back per step
    assert counts[6][0] >= 1                                     # x_T


# ----------------------------------------------------------------------------- fid.py's features, and the trainer's evaluation

def test_fid_features_come_to_the_host_before_they_become_float64(tmp_path):
    """The proxy CNN (fid.py --proxy, the trainer's --eval-every) and Inception-v3 (fid.py) run on the
    device; their features are float64 for the Fréchet distance, cast after .cpu(), not before."""
    import numpy as np

    from plumbing.files import save_checkpoint
    from scoring.inception import Inception, fidelity_network
    from scoring.proxy import Proxy, ProxyNet

    config = {"task": "classes", "dataset": "mnist", "channels": 1, "num_classes": 10, "image_size": 28, "width": 8,
              "feature_dim": 16, "test_accuracy": 0.5}
    save_checkpoint({"config": config, "model": ProxyNet(1, 10, 28, 8, 16).state_dict()}, tmp_path / "proxy.pt")
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    inception = Inception.__new__(Inception)              # the network without a weights file: random weights
    with DeviceRules() as rules:
        feats, probs = Proxy(tmp_path / "proxy.pt", DEVICE).features(images)
        inception.net, inception.device = fidelity_network(None, DEVICE), DEVICE
        pool = inception.features(images[:1], progress=False)
    assert feats.dtype == probs.dtype == pool.dtype == np.float64 and pool.shape == (1, 2048)
    assert rules.broken == []
