"""Where the work runs: the device choice every script shares, bf16 where it is fast, CUDA's speed
settings, DDP's set-up (torchrun sets RANK) and the few collectives the trainer needs, the RNG
states a checkpoint stores, and the device sync that honest timings need.

What each device does differently (docs/devices.md has the table, and what has run where):
    precision   bf16 autocast on CUDA cards with bf16 tensor cores (compute capability ≥ 8) and on CPUs
                with native bf16; float32 everywhere else: on Apple MPS, on older CUDA cards (whose
                bf16 is emulated), on other CPUs. Never float16: training would need loss scaling.
    float64     never on the device (MPS has none): schedules are computed on the host and cast
    DDP         NCCL on CUDA, gloo on the CPU; PyTorch has no DDP backend for MPS
"""

import gc
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


DEVICE_HELP = "auto (the default: CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:1 or mps"   # every --device


def pick_device(name="auto"):
    """The one device rule, --device -> torch.device: "auto" -> CUDA, then Apple MPS, then CPU;
    otherwise the named device, checked to exist. Under torchrun, ddp_backend applies this rule too."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available here; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name}: Apple MPS is not available here; use --device auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: --device {name}: this repo runs on cpu, cuda or mps; use one of those (or auto)")
    return device


def bf16_fast(device):
    """Whether bf16 autocast speeds the network up here: CUDA cards with bf16 tensor cores (compute
    capability ≥ 8: A100, RTX 30xx, H100, …), and CPUs with native bf16 instructions (AVX512-BF16 or
    AMX). Elsewhere bf16 is emulated, and slower than float32: older CUDA cards (V100, T4, RTX 20xx,
    which torch.cuda.is_bf16_supported() counts as supported by emulation), other CPUs, and Apple MPS
    (left at float32: no bf16 run has been measured there)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def autocast(device, enabled=True):
    """bf16 autocast where bf16_fast(device), else a no-op. The weights, the optimiser and the
    diffusion arithmetic stay float32; only the network's convolutions and matmuls run in bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bf16_fast(device))


def ddp_backend(name="auto"):
    """--device under torchrun -> (DDP backend, device type): pick_device's choice, with NCCL and one GPU
    per process on CUDA (the process's GPU is LOCAL_RANK's), gloo on the CPU. PyTorch's DDP has no
    backend for Apple MPS: "mps" is refused, and "auto" on a Mac trains on the CPU."""
    if name == "mps":
        raise SystemExit("error: --device mps under torchrun: PyTorch's DDP has no backend for Apple MPS; "
                         "train in one process (python train_<dataset>.py --device mps), or use --device cpu")
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise SystemExit(f"error: --device {name} under torchrun: use auto, cuda or cpu")
    if pick_device(name).type == "cuda":                   # "cuda…" is refused where CUDA is not there
        return "nccl", "cuda"
    return "gloo", "cpu"                                   # the CPU, or "auto" on a Mac


def setup_distributed(args):
    """-> (device, rank, world_size). DDP only when torchrun has set RANK; the backend is ddp_backend's."""
    if "RANK" not in os.environ:
        return pick_device(args.device), 0, 1
    backend, device_type = ddp_backend(args.device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), rank, world
    return torch.device("cpu"), rank, world



def wrap_ddp(model, device):
    """model in DistributedDataParallel: its gradients all-reduced (averaged) over the ranks at each
    backward. On the CPU, a 1×1 convolution's weight gradient comes back with other strides than its
    weight's ([o, i, 1, 1] as (i, 1, i, i) against (i, 1, 1, 1)), and DDP warns once a process that
    this "may impair performance". For a 1×1 kernel both strides put the same numbers in the same
    order, so the warning says nothing there and is silenced, on the CPU only."""
    if device.type == "cpu":
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def leave_distributed(all_ended):
    """The end of a DDP process: with all_ended (this rank's sitting ended without an error, so every rank
    reaches here) the ranks first wait for each other, so that none tears its connections down while
    rank 0 still saves. Then a garbage collection: the DDP wrapper holds the process group, and reference
    cycles inside libraries can keep the finished sitting's frames, and so the wrapper, alive until the
    interpreter's exit, where gloo's threads can abort the process. Then the group goes. No-op without DDP."""
    if not dist.is_initialized():
        return
    if all_ended:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def rank_max(values, device, world):
    """The element-wise maximum of a list of floats over all ranks (one all-reduce), so that every
    rank takes the same decision: when to stop, which learning rate."""
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def rng_state(device):
    """The RNG states training draws from: the CPU's, and the device's (t, ε and dropout are drawn
    there). numpy and python `random` are not used by training (the data order is stateless)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def synchronize(device):
    """Wait for the device's queued work (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(call, device, budget=1.0):
    """The time of one call of `call()` on `device`: one untimed warm-up (the first call at a shape
    is slow: allocation, kernel choice), then the best of up to three timed calls within `budget`
    seconds. The estimates of generate.py and the demo both come from here."""
    call()
    times = []
    while len(times) < 3 and sum(times) < budget:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def cuda_fast_settings(model=None):
    """TF32 matmuls and convolutions, cuDNN's autotuner, and channels_last weights (when a model is
    given): the speed settings of training and benchmarking on CUDA. Call only on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    if model is not None:
        model.to(memory_format=torch.channels_last)
