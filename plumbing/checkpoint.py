"""Checkpoints: one torch.save dict of plain types and tensors, written atomically, read with
weights_only=True so that no pickled code ever runs (the safe reading and writing is files.py's).

Layout (save_run; both files carry "config", so generate.py / fid.py / app.py rebuild the model from it):
    <ckpt-dir>/<run>.pt       {"config", "model", "ema", "optimizer", "step", "rng", "data_state",
                               "images_seen", "train_flops", ...}                                   (resume)
    <ckpt-dir>/<run>_ema.pt   {"config", "ema_model", "step", "images_seen", "train_flops", ...}    (sampling)
With --ema-extra-decays, <run>.pt also holds "ema_extra": {"0.9995": EMA state, ...}, and each extra
decay d has its own <run>_ema<d>.pt, laid out as <run>_ema.pt; its config["train"] says "ema_decay": d
(and lists the run's other decays, the main one first, as "ema_extra_decays"). A run started with
--init-from adds "before" to all of them: {"step", "images_seen", "train_flops", "train_seconds"}
that its starting weights had seen (seen_in_all).

config = {"dataset": str,
          "model":     UNet keyword arguments,
          "diffusion": GaussianDiffusion keyword arguments (image_size, channels, timesteps, ...),
          "data":      {"name", "image_size", "channels", "class_names": [...] or None, "num_images"},
          "train":     the trainer's resolved hyperparameters}
"""

import copy

import torch

from plumbing.device import bf16_fast
from plumbing.files import CheckpointError, load_checkpoint, save_checkpoint
from diffusion import GaussianDiffusion
from unet import UNet


# ----------------------------------------------------------------------------- the layout

# What a checkpoint says about the compute behind it (both files, and a shipped model): training
# FLOPs = 3 × flops_per_image × images_seen (budget.training_flops); train_seconds over all sittings.
# A run started with --init-from also carries "before": what its starting weights had seen in all
# (seen_in_all of that checkpoint), so a chain of runs still says what its model cost.
COMPUTE_KEYS = ("images_seen", "flops_per_image", "train_flops", "train_seconds")
SEEN_KEYS = ("step", "images_seen", "train_flops", "train_seconds")


def seen_in_all(ckpt):
    """What a model has seen over its whole --init-from chain: its own counters plus its "before"
    -> {step, images_seen, train_flops, train_seconds} (a counter a checkpoint lacks counts 0)."""
    earlier = ckpt.get("before") or {}
    return {k: (ckpt.get(k) or 0) + (earlier.get(k) or 0) for k in SEEN_KEYS}


def model_settings(args, channels, image_size, num_classes):
    """The trainer's resolved flags -> (UNet keyword arguments, GaussianDiffusion keyword arguments):
    the one mapping from flags to the model, for make_config and benchmark.py."""
    model = dict(in_channels=channels, base_channels=args.base_channels, channel_mults=list(args.channel_mults),
                 num_res_blocks=args.num_res_blocks, attn_resolutions=list(args.attn_resolutions),
                 dropout=args.dropout, image_size=image_size, num_classes=num_classes)
    diffusion = dict(image_size=image_size, channels=channels, timesteps=args.timesteps, schedule=args.schedule,
                     objective=args.objective, variance=args.variance, clip_denoised=args.clip_denoised,
                     cond_drop_prob=args.cond_drop_prob, loss_weighting=args.loss_weighting,
                     min_snr_gamma=args.min_snr_gamma, t_sampling=args.t_sampling,
                     lognormal_mean=args.lognormal_mean)
    return model, diffusion


def make_config(args, images, class_names, num_classes):
    """The config every checkpoint carries, from the trainer's resolved flags (args) and the data:
    everything generate.py / fid.py / app.py need to rebuild the model, and the flags for --resume."""
    model_kwargs, diffusion_kwargs = model_settings(args, images.shape[1], images.shape[-1], num_classes)
    train = {k: v for k, v in vars(args).items() if not k.startswith("debug_")}
    if not train.get("ema_extra_decays", True):
        del train["ema_extra_decays"]           # none: the config stays as it was before the option
    # "dataset" is what data.load_dataset takes (fid.py reloads the real images from it); the
    # file names use args.run_name ("celeba" trains on dataset "faces").
    return {"dataset": str(args.dataset), "model": model_kwargs, "diffusion": diffusion_kwargs,
            "data": {"name": str(args.dataset), "image_size": images.shape[-1], "channels": images.shape[1],
                     "class_names": class_names, "num_images": len(images)},
            "train": train}


def cpu_state(ema):
    """An EMA's state_dict with its tensors on the CPU."""
    state = ema.state_dict()
    state["shadow"] = {k: v.cpu() for k, v in state["shadow"].items()}
    return state


def save_run(path, ema_path, config, model, ema, optimizer, step, rng, data_state, stats, extras=()):
    """A training run's files, atomically: `path` holds everything --resume needs, `ema_path`
    only what sampling needs (the EMA weights in the model's dtypes, the config, the compute).
    stats: plain numbers of the run (nan_skipped, nan_streak, train_seconds, progress, images_seen,
    flops_per_image, train_flops; before under --init-from; rng_ranks under DDP). extras: (decay,
    EMA, path) of each --ema-extra-decays, written to `path` like `ema_path`. Refuses non-finite
    weights: the previous files are then left as they were. Each file is written atomically, `path`
    last: a save that fails part way leaves `path` at the last step it held, and a run resumed from
    it saves the EMA files again, even one that has already reached its budget."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ema_state = cpu_state(ema)
    extra_states = {str(decay): cpu_state(extra) for decay, extra, _ in extras}
    shadows = [ema_state["shadow"], *(state["shadow"] for state in extra_states.values())]
    for tensors in (weights.values(), *(shadow.values() for shadow in shadows)):
        if not all(bool(torch.isfinite(v).all()) for v in tensors if v.is_floating_point()):
            raise CheckpointError(f"refusing to save non-finite weights at step {step}; the last good "
                                  f"checkpoint is {path}")
    compute = {k: stats[k] for k in (*COMPUTE_KEYS, "before") if k in stats}
    save_checkpoint({"config": config, "step": step, **compute,
                     "ema_model": {k: v.to(weights[k].dtype) for k, v in ema_state["shadow"].items()}}, ema_path)
    for decay, _, extra_path in extras:           # each as <run>_ema.pt, its config naming its decay
        train = config["train"]
        others = [train["ema_decay"], *(d for d in train["ema_extra_decays"] if d != decay)]
        extra_config = {**config, "train": {**train, "ema_decay": decay, "ema_extra_decays": others}}
        shadow = extra_states[str(decay)]["shadow"]
        save_checkpoint({"config": extra_config, "step": step, **compute,
                         "ema_model": {k: v.to(weights[k].dtype) for k, v in shadow.items()}}, extra_path)
    # `path` last: until it is written, --resume starts before this step and saves every file again
    save_checkpoint({"config": config, "model": weights, "ema": ema_state, "optimizer": optimizer.state_dict(),
                     "step": step, "rng": rng, "data_state": data_state, **stats,
                     **({"ema_extra": extra_states} if extras else {}),
                     "versions": {"torch": str(torch.__version__)}}, path)


LOCAL_PATHS = ("ckpt_dir", "sample_dir", "log_dir", "data_dir", "tensorboard", "debug_dump_dir")


def save_pretrained(ckpt, path, quality=None):
    """A shipped model (pretrained/): the EMA weights in half precision, the config, what the model has
    seen (steps, images, PFLOP, hours) and its measured quality, one line such as "FID-10k 30.1
    (ancestral DDPM, 50 steps)". Read back with load_for_sampling, which computes in float32."""
    weights = {k: v.half() if v.is_floating_point() else v for k, v in ema_weights(ckpt).items()}
    keep = ("step", *COMPUTE_KEYS, "before")
    config = copy.deepcopy(ckpt["config"])
    for key in LOCAL_PATHS:            # the training machine's folders: meaningless in a clone, not shipped
        if key in config.get("train", {}):
            config["train"][key] = None
    return save_checkpoint({"config": config, "ema_model": weights, "quality": quality,
                            **{k: ckpt[k] for k in keep if k in ckpt}}, path)


# ----------------------------------------------------------------------------- reading

def build_diffusion(config):
    """Rebuild the (untrained) UNet and GaussianDiffusion from a stored config alone."""
    unet = UNet(**config["model"])
    return GaussianDiffusion(unet, **config["diffusion"])


def ema_weights(ckpt):
    """The EMA weights of a checkpoint as a UNet state dict (falls back to the raw weights)."""
    if "ema_model" in ckpt:
        return ckpt["ema_model"]
    if "ema" in ckpt:
        return ckpt["ema"]["shadow"]
    return ckpt["model"]


def load_for_sampling(path, device="cpu", amp=True):
    """checkpoint path -> (GaussianDiffusion with EMA weights, in eval mode on device, config).
    amp: run the network in bf16 where that is fast here (bf16_fast); False keeps float32."""
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    try:
        diffusion = build_diffusion(config)
        diffusion.model.load_state_dict(ema_weights(ckpt))
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config and weights do not fit together ({e})") from None
    diffusion.amp = amp and bf16_fast(torch.device(device))
    # What the model has seen (older checkpoints: step × batch size, and no FLOPs).
    batch = config.get("train", {}).get("batch_size")
    diffusion.trained = {"step": ckpt.get("step"), **{k: ckpt.get(k) for k in (*COMPUTE_KEYS, "before")}}
    if "images_seen" not in ckpt:
        diffusion.trained["images_seen"] = (ckpt.get("step") or 0) * (batch or 0) or None
    return diffusion.to(device).eval(), config
