"""The Gradio demo: watch a trained DDPM denoise, live, in the browser.

    python app.py                                   # pretrained/*.pt and every checkpoints/*_ema.pt, --device auto
    python app.py --ckpt checkpoints/mnist_ema.pt   # only these (repeatable)
    python app.py --port 7861 --host 0.0.0.0        # serve on the network; --share for a public link

Pick a checkpoint, a sampler (ancestral DDPM on a 50-step respacing by default), a seed and how many images; for a
class-conditional model also the class and the classifier-free guidance weight w. For a model with a best
measured sampling (plumbing/sampling.py's BEST_SAMPLING; CIFAR-10: EDM's Heun, --steps 50, churn 0,
w = 3 only where 0.28 < σ ≤ 5.42, the "guidance interval" box), the page opens on it, as generate.py
does with no sampling flag (its 16 images fit the demo's 10 s on a 2-core CPU: docs/demo.md), and one
button sets it again after a change. The page shows
x_t and the model's current guess x̂_0 side by side while the reverse chain runs (as often as those
frames cost at most a fifth of the run), then the final grid, with the grid as a PNG to download.
The time estimate is the network's timed calls until a model has run, then its last run's time.
The page only lists the checkpoints it found: it never takes a file path, and it lists a model
trained for under one epoch last, marked as noise. One run at a time; later clicks wait in a queue.

Without a checkpoint the page says how to train one: python train_mnist.py (writes
checkpoints/mnist_ema.pt). Everything is rebuilt from the config stored in the checkpoint.
"""

import argparse
import atexit
import errno
import math
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import torch

from plumbing.checkpoint import CheckpointError, ema_weights, load_checkpoint, load_for_sampling, seen_in_all
from plumbing.device import DEVICE_HELP, pick_device, synchronize as sync
from plumbing.data import default_class_names
from diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from plumbing.images import NonFiniteImages, make_grid, to_pil, to_uint8
from plumbing.sampling import (THREADS_HELP, SamplingError, best_sampling, best_sampling_flags,
                               estimate_seconds as sampling_seconds, resolve_sampling, set_threads)
from samplers import CHURN, Guidance

# ----------------------------------------------------------------------------- the page's limits
CKPT_DIR = "checkpoints"     # where *_ema.pt are looked for without --ckpt
PRETRAINED_DIR = "pretrained"  # the shipped models (ship.py): *.pt, opened on a fresh clone
DEFAULT_IMAGES = 16
MAX_IMAGES = 64
DEFAULT_GUIDANCE = 0.0       # CFG w: out = (1 + w)·out(y) − w·out(∅); 0 = plain conditional, one call
                             # per step (on MNIST the best proxy FID; w = 1 is crisper but less varied)
MAX_GUIDANCE = 20.0
FRAMES = 25                  # live updates of x_t / x̂_0 per run, at most
PREVIEW_SHARE = 0.2          # ... and they may take at most this share of the run: each costs two PNGs and the
                             # page's handling (30-70 ms on a 2-core CPU), which doubled a fast CPU's CIFAR-10 run
FRAME_GAP = 0.25             # s: at most 4 frames a second (the server sends them while the chain runs on)
FIRST_ESTIMATE = 1 / (1 - PREVIEW_SHARE)  # a run / its network calls (at most, with the frames' share at its
                                          # cap), until a run of the model is measured
PADDING = 2                  # pixels between the images of a grid (images.make_grid's default)
DISPLAY_PX = 512             # grids are shown enlarged (nearest neighbour) to about this size
MODEL_CACHE = 2              # models kept loaded
QUEUE_SIZE = 16              # runs waiting beyond that are refused ("queue full")
ALL_CLASSES = "all classes, in turn"
SAMPLERS = {"DDIM": "ddim", "DDPM": "ddpm", "EDM": "edm", "DPM-Solver++": "dpmpp2m"}     # shown: used
SHOWN = {name: shown for shown, name in SAMPLERS.items()}
SHOWN_DEFAULT = SHOWN[DEFAULT_SAMPLER]

TRAIN_FIRST = """\
### No checkpoint found

This demo samples from a trained model, and none was found{where}. Train the MNIST one first,
then start the demo again:

```bash
python train_mnist.py --max-minutes 15                         # writes checkpoints/mnist_ema.pt
DDPM_DATA=path/to/data python train_mnist.py --max-minutes 15  # offline: a folder with mnist_train.npz
python app.py
```

or point the demo at checkpoints elsewhere: `python app.py --ckpt path/to/model_ema.pt`.
"""


# ----------------------------------------------------------------------------- checkpoints

def discover_checkpoints(ckpt_dir=CKPT_DIR, ckpts=None, pretrained_dir=PRETRAINED_DIR):
    """The --ckpt files if any were given, else the shipped models (<pretrained_dir>/*.pt) and every
    <ckpt_dir>/*_ema.pt, sorted."""
    if ckpts:
        return [Path(p) for p in ckpts]
    return sorted(Path(pretrained_dir).glob("*.pt")) + sorted(Path(ckpt_dir).glob("*_ema.pt"))


def describe_checkpoints(paths):
    """paths -> ({display name: info dict}, [problem messages]). Unusable files become problems."""
    infos, problems = {}, []
    for path in paths:
        try:
            ckpt = load_checkpoint(path)
            config = ckpt["config"]
            params = sum(v.numel() for v in ema_weights(ckpt).values())
            diffusion_cfg, model_cfg = config["diffusion"], config["model"]
        except CheckpointError as e:
            problems.append(str(e))
            continue
        except (KeyError, TypeError, AttributeError) as e:
            problems.append(f"{path}: not a checkpoint of this repo (missing {e}); use a file written by train_*.py")
            continue
        name = path.stem if path.stem not in infos else str(path)
        if path.parent.name == PRETRAINED_DIR and f"{path.stem} (shipped)" not in infos:
            name = f"{path.stem} (shipped)"
        num_classes = model_cfg.get("num_classes")
        class_names = (config.get("data") or {}).get("class_names")
        if num_classes:
            class_names = default_class_names(num_classes, class_names)
        in_all, n_data = seen_in_all(ckpt), (config.get("data") or {}).get("num_images")   # --init-from chain too
        seen = in_all["images_seen"] if ckpt.get("images_seen") is not None else None
        infos[name] = {
            "undertrained": seen is not None and bool(n_data) and seen < n_data,     # under one epoch: noise
            "path": str(path), "config": config, "params": params,
            "step": in_all["step"] if ckpt.get("step") is not None else None,
            "quality": ckpt.get("quality"), "T": diffusion_cfg.get("timesteps", 1000), "image_size": diffusion_cfg["image_size"],
            "channels": diffusion_cfg["channels"], "num_classes": num_classes, "class_names": class_names,
            "best": best_sampling(config),        # its best measured sampling, which the button sets; or None
        }
        del ckpt
    return infos, problems


class ModelCache:
    """The last few loaded models, keyed by (path, device); loading is serialised by a lock."""

    def __init__(self, size=MODEL_CACHE):
        self.size, self.models, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, path, device):
        key = (path, str(device))
        with self.lock:
            if key not in self.models:
                try:
                    self.models[key] = load_for_sampling(path, device)[0]
                except CheckpointError as e:
                    raise gr.Error(str(e)) from None
                while len(self.models) > self.size:
                    self.models.popitem(last=False)
            self.models.move_to_end(key)
            return self.models[key]


# ----------------------------------------------------------------------------- images

def to_grid(x, nrow=None):
    """(n, C, H, W) in [−1, 1] (x_t may stray outside: clamped) -> uint8 grid (H', W', C),
    ⌈√n⌉ images a row, PADDING white pixels around each image."""
    return make_grid(to_uint8(x), nrow, padding=PADDING)


def display_scale(height, width):
    """Integer factor that brings a grid to about DISPLAY_PX, for crisp pixels in the browser."""
    return max(1, DISPLAY_PX // max(height, width))


def to_display(grid):
    """uint8 grid (H, W, C) -> uint8 (sH, sW, 3), enlarged by display_scale (nearest neighbour)."""
    s = display_scale(*grid.shape[:2])
    big = grid.repeat(s, axis=0).repeat(s, axis=1)
    return big.repeat(3, axis=2) if big.shape[2] == 1 else big


def save_png(grid, folder, stem):
    """Save the grid at its true size (grayscale for 1-channel models) and return the path."""
    path = Path(tempfile.mkdtemp(dir=folder)) / f"{stem}.png"
    to_pil(grid).save(path)
    return str(path)


def interval_label(band):
    """The guidance interval box's label for a band (σ_lo, σ_hi), or a blank one where the model has none."""
    return "Guidance interval: w only where {:g} < σ ≤ {:g}".format(*band) if band else "Guidance interval"


# ----------------------------------------------------------------------------- the app

class App:
    """The state behind the page: the checkpoints, the model cache, the timing cache."""

    def __init__(self, infos, device):
        self.infos, self.device = infos, torch.device(device)
        self.models = ModelCache()
        self.call_seconds = {}      # (path, device, batch) -> seconds for one network call
        self.calibration = {}       # path -> (seconds a whole run took) / (its network calls' time)
        self.clock = time.perf_counter
        self.last_run = None        # {"seconds", "preview", "estimate"} of the last run: its time, its live frames'
                                    # and the page's estimate of it (None if the page had not timed these settings)
        self.out_dir = tempfile.mkdtemp(prefix="ddpm_app_")
        atexit.register(shutil.rmtree, self.out_dir, ignore_errors=True)

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, name, sampler, steps, seed, n, class_name, guidance, interval=False):
        """Validate on the server (the sliders' limits are only a hint to the browser): the page's own
        limits here, the model's through sampling.resolve_sampling, the check generate.py uses.
        interval: apply w only in the model's measured guidance interval (its best sampling's).
        Returns (info, diffusion, sampler, steps, seed, n, labels or None, Guidance) or raises gr.Error."""
        if name not in self.infos:
            raise gr.Error(f"unknown model {name!r}; choose one of {sorted(self.infos)}")
        info = self.infos[name]
        if sampler not in SAMPLERS:
            raise gr.Error(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")

        def whole(value, what):
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value != int(value):
                raise gr.Error(f"{what} must be a whole number, got {value!r}")
            return int(value)

        steps, n, seed = whole(steps, "steps"), whole(n, "number of images"), whole(seed, "seed")
        if not 1 <= n <= MAX_IMAGES:
            raise gr.Error(f"number of images must be between 1 and {MAX_IMAGES}, got {n}")
        if not 0 <= seed < 2**63:
            raise gr.Error(f"seed must be between 0 and 2^63 − 1, got {seed}")
        class_ = None
        if info["num_classes"]:
            if guidance is None or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
                raise gr.Error(f"guidance w must be between 0 and {MAX_GUIDANCE:g}, got {guidance!r}")
            class_ = None if class_name == ALL_CLASSES else class_name
        guidance = float(guidance) if info["num_classes"] else 0.0
        band = (info["best"] or {}).get("guidance_interval")
        if interval and not band:
            raise gr.Error("this model has no measured guidance interval; leave the box unticked")
        diffusion = self.models.get(info["path"], self.device)
        try:
            steps, labels, _ = resolve_sampling(diffusion, info["config"], sampler=SAMPLERS[sampler], steps=steps,
                                                n=n, class_=class_, guidance=guidance)
        except SamplingError as e:
            raise gr.Error(f"{e.setting}: {e}") from None
        return info, diffusion, sampler, steps, seed, n, labels, Guidance(guidance, *(band if interval else ()))

    def churn(self, info, sampler):
        """EDM's S_churn on this page: the model's best sampling's where that is EDM, else EDM's CHURN."""
        best = info["best"] or {}
        return {"churn": best.get("churn", CHURN) if best.get("sampler") == "edm" else CHURN} if sampler == "EDM" else {}

    def guided_calls(self, info, sampler, steps, guidance):
        """How many of the run's network calls evaluate the guided pair (y, ∅) at batch 2n: all of them
        with w > 0 at every step, those whose σ lies in the interval, none at w = 0."""
        if not guidance.w:
            return 0
        diffusion = self.models.get(info["path"], self.device)
        ts = diffusion.sampling_timesteps(SAMPLERS[sampler], steps, **self.churn(info, sampler))
        return guidance.calls(diffusion.sigma_table, ts) - len(ts)

    def page_defaults(self, info):
        """The settings the page opens a model on, as generate.py's with no sampling flag: its best
        measured sampling where it has one (the button sets it again), else the plain defaults
        -> (sampler as shown, steps, w, interval ticked)."""
        best = info["best"]
        if best:
            return SHOWN[best["sampler"]], self.steps_for(info, best["steps"], best["sampler"]), best["guidance"], \
                "guidance_interval" in best
        return SHOWN_DEFAULT, self.steps_for(info, DEFAULT_STEPS), DEFAULT_GUIDANCE, False

    # ------------------------------------------------------------------ time estimate

    def seconds_per_call(self, info, batch):
        """Time one network call at this batch size (cached per checkpoint, device and batch), the
        way generate.py times it: through diffusion.network, in bf16 where sampling runs in bf16."""
        key = (info["path"], str(self.device), batch)
        if key not in self.call_seconds:
            diffusion = self.models.get(info["path"], self.device)
            self.call_seconds[key] = sampling_seconds(diffusion, batch, n=batch, calls=1)
        return self.call_seconds[key]

    @staticmethod
    def call_batches(calls, n, guided):
        """[(how many calls, at what batch)] of a run: calls − guided at batch n, `guided` at 2n."""
        return [(k, batch) for k, batch in ((calls - guided, n), (guided, 2 * n)) if k]

    def calls_seconds(self, info, calls, n, guided):
        """The network calls' seconds alone: calls − guided at batch n, `guided` at batch 2n (guidance runs
        the net on (y, ∅) together), each batch size timed on this device."""
        return sum(k * self.seconds_per_call(info, batch) for k, batch in self.call_batches(calls, n, guided))

    def timed(self, info, calls, n, guided):
        """Whether every batch size this run needs has been timed on this device."""
        return all((info["path"], str(self.device), batch) in self.call_seconds
                   for _, batch in self.call_batches(calls, n, guided))

    def estimate_seconds(self, info, calls, n, guided):
        """Seconds for a whole run of `calls` network calls, `guided` of them guided (guided_calls): the
        calls, timed on this device, scaled by what the last real run of this model took beyond them
        (the sampler's arithmetic, the live frames); before the first run, by FIRST_ESTIMATE (the live
        frames take up to PREVIEW_SHARE of a run). -> (seconds, the largest batch)."""
        scale = self.calibration.get(info["path"], FIRST_ESTIMATE)
        return self.calls_seconds(info, calls, n, guided) * scale, 2 * n if guided else n

    def calibrate(self, info, calls, n, guided, seconds):
        """After a real run: remember how its time compared with the network calls' alone (either way:
        the next estimate of the same settings is this run's time)."""
        if calls and self.timed(info, calls, n, guided):
            self.calibration[info["path"]] = seconds / self.calls_seconds(info, calls, n, guided)

    def estimate(self, name, sampler, steps, n, class_name, guidance, interval=False):
        """Markdown: how long a run with these settings will take."""
        try:
            info, _, sampler, calls, _, n, _, guidance = self.check_inputs(name, sampler, steps, 0, n, class_name,
                                                                           guidance, interval)
        except gr.Error as e:
            return f"⚠️ {e.message}"
        guided = self.guided_calls(info, sampler, calls, guidance)
        seconds, batch = self.estimate_seconds(info, calls, n, guided)
        how = ("calibrated on the last run" if info["path"] in self.calibration
               else f"network calls + up to {FIRST_ESTIMATE - 1:.0%} for the live frames; calibrated after the first run")
        at = (f"batch {batch}" if guided in (0, calls) else f"batch {2 * n} for the {guided} guided, {n} for the rest")
        return f"Estimated time: **≈ {seconds:.1f} s** on {self.device.type} ({calls} network calls at {at}; {how})."

    def steps_for(self, info, steps, sampler=DEFAULT_SAMPLER):
        """The sampler's calls for `steps` on this model: steps, at most its T."""
        diffusion = self.models.get(info["path"], self.device)
        return len(diffusion.sampling_timesteps(sampler, steps, cap_steps=True))

    def default_seconds(self, name):
        """A default run's estimated seconds (page_defaults, DEFAULT_IMAGES) for this model."""
        info = self.infos[name]
        sampler, calls, w, interval = self.page_defaults(info)
        guidance = self.check_inputs(name, sampler, calls, 0, DEFAULT_IMAGES, ALL_CLASSES, w, interval)[-1]
        return self.estimate_seconds(info, calls, DEFAULT_IMAGES, self.guided_calls(info, sampler, calls, guidance))[0]

    def model_choices(self):
        """[(label with the default run's estimate, name)], fastest first, a model trained for under one
        epoch (a run stopped early: noise) last and marked so: the page opens on the first."""
        seconds = {name: self.default_seconds(name) for name in self.infos}
        noise = " · under one epoch of training: expect noise"
        return [(f"{name}{' · ' + self.infos[name]['quality'] if self.infos[name].get('quality') else ''} · "
                 f"≈ {seconds[name]:.1f} s a run here{noise if self.infos[name].get('undertrained') else ''}", name)
                for name in sorted(seconds, key=lambda k: (bool(self.infos[k].get("undertrained")), seconds[k]))]

    # ------------------------------------------------------------------ model choice

    def model_markdown(self, info):
        cfg = info["config"]
        kind = (f"class-conditional ({info['num_classes']} classes)" if info["num_classes"] else "unconditional")
        step = f", trained {info['step']:,} steps" if info.get("step") else ""
        step += f" · {info['quality']}" if info.get("quality") else ""
        diffusion_cfg = cfg["diffusion"]
        return (f"**{cfg.get('dataset', '?')}** · {info['image_size']}×{info['image_size']}×{info['channels']} · "
                f"{info['params'] / 1e6:.2f}M parameters{step} · {kind} · T = {info['T']}, "
                f"{diffusion_cfg.get('schedule', 'linear')} schedule, predicts {diffusion_cfg.get('objective', 'eps')}"
                + (f"\n\nIts best measured sampling (the button below): `{best_sampling_flags(info['best'])}`"
                   if info["best"] else "")
                + ("\n\n⚠️ trained for less than one pass over its data (a run stopped early?): expect noise; the "
                   "shipped models are marked (shipped)" if info.get("undertrained") else ""))

    def on_model_change(self, name):
        """Model picked -> its description, and the inputs set to its defaults (page_defaults): the
        sampler, the steps (at most its T), the class and guidance inputs, the guidance interval box."""
        if name not in self.infos:
            raise gr.Error(f"unknown model {name!r}; choose one of {sorted(self.infos)}")
        info = self.infos[name]
        conditional = bool(info["num_classes"])
        band = (info["best"] or {}).get("guidance_interval")
        sampler, steps, guidance, interval = self.settings_updates(info)
        return (self.model_markdown(info), sampler, steps, guidance,
                {**interval, "visible": bool(band), "label": interval_label(band)},
                gr.update(choices=[ALL_CLASSES, *(info["class_names"] or [])], value=ALL_CLASSES, visible=conditional),
                gr.update(visible=bool(info["best"])))

    def settings_updates(self, info):
        """page_defaults as the updates of the sampler, steps, guidance and interval inputs."""
        sampler, steps, w, interval = self.page_defaults(info)
        return (gr.update(value=sampler), gr.update(maximum=info["T"], value=steps),
                gr.update(visible=bool(info["num_classes"]), value=w), gr.update(value=interval))

    def on_best(self, name):
        """The "best measured sampling" button -> the sampler, steps, guidance and interval inputs set to it."""
        if name not in self.infos:
            raise gr.Error(f"unknown model {name!r}; choose one of {sorted(self.infos)}")
        return self.settings_updates(self.infos[name])

    # ------------------------------------------------------------------ generation

    def generate(self, name, sampler, steps, seed, n, class_name, guidance, interval=False):
        """Stream (x_t grid, x̂_0 grid, final grid, PNG path, status) while the reverse chain runs; samples
        that are not finite end it with their message (images.NonFiniteImages), nothing saved."""
        try:
            yield from self.run(name, sampler, steps, seed, n, class_name, guidance, interval)
        except NonFiniteImages as e:
            raise gr.Error(str(e)) from None

    def run(self, name, sampler, steps, seed, n, class_name, guidance, interval):
        info, diffusion, sampler, steps, seed, n, labels, guidance = self.check_inputs(
            name, sampler, steps, seed, n, class_name, guidance, interval)     # loads the model (cached)
        total = steps                                                     # network calls
        guided = self.guided_calls(info, sampler, steps, guidance)
        every = max(1, math.ceil(total / FRAMES))
        if labels is not None:
            labels = labels.to(self.device)
        generator = torch.Generator("cpu").manual_seed(seed)    # same images on every device
        timed = self.timed(info, total, n, guided)
        predicted = self.estimate_seconds(info, total, n, guided)[0] if timed else None    # what the page said
        start = self.clock()
        x, preview, frames = None, 0.0, 0     # seconds of live frames (drawing them, the page's handling of each)
        last_frame = -math.inf
        for k, (t, x, x0) in enumerate(diffusion.sample_iter(
                n, sampler=SAMPLERS[sampler], steps=steps, labels=labels, guidance=guidance,
                generator=generator, progress=False, **self.churn(info, sampler))):
            now = self.clock()
            frame = preview / frames if frames else 0.0           # a frame's cost, as measured so far
            if ((k + 1) % every == 0 and k + 1 < total and now - last_frame >= FRAME_GAP
                    and preview + frame <= PREVIEW_SHARE * (now - start + frame)):
                elapsed = now - start
                left = elapsed / (k + 1) * (total - k - 1)
                yield (to_display(to_grid(x)), to_display(to_grid(x0)), None, None,
                       f"Step {k + 1}/{total} (t = {t:.0f}) · {elapsed:.1f} s, about {left:.1f} s left")
                preview, frames, last_frame = preview + self.clock() - now, frames + 1, now
        sync(self.device)
        grid = to_grid(x)
        seconds = self.clock() - start
        self.last_run = {"seconds": seconds, "preview": preview, "estimate": predicted}
        self.calibrate(info, total, n, guided, seconds)
        what = f"{sampler.lower()}{steps}_seed{seed}" + (f"_w{guidance.w:g}" if info["num_classes"] else "")
        what += "_s{:g}-{:g}".format(guidance.sigma_lo, guidance.sigma_hi) if interval and guidance.w else ""
        png = save_png(grid, self.out_dir, f"{name}_{what}")
        shown = to_display(grid)
        yield (shown, to_display(to_grid(x0)), shown, png,
               f"Done: {n} images, {sampler} {steps} steps{f', {guided} of them guided' if guided else ''}, "
               f"seed {seed}, in {seconds:.1f} s.")


def build_demo(ckpt_paths, device="cpu", ckpt_dir=CKPT_DIR):
    """The page for these checkpoints (queue set up); without a usable one, the training hint."""
    infos, problems = describe_checkpoints([Path(p) for p in ckpt_paths])
    warning = "".join(f"\n> ⚠️ {p}\n" for p in problems)
    with gr.Blocks(title="DDPM: live generation", analytics_enabled=False) as demo:
        gr.Markdown("# Denoising diffusion, live\nThe reverse chain from noise x_T to an image x_0: each step "
                    "the network predicts the noise ε (or v, or x_0), hence a guess x̂_0 of the final image.")
        if not infos:
            where = f" (no *_ema.pt in {ckpt_dir}/)" if not ckpt_paths else ""
            gr.Markdown(TRAIN_FIRST.format(where=where) + warning, elem_id="no-checkpoint")
            return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)

        app = App(infos, device)
        choices = app.model_choices()                     # fastest on this device first
        first = infos[choices[0][1]]
        conditional = bool(first["num_classes"])
        first_sampler, first_steps, first_w, first_interval = app.page_defaults(first)
        first_band = (first["best"] or {}).get("guidance_interval")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                model = gr.Dropdown(choices, value=choices[0][1], label="Model",
                                    info="fastest on this device first; the time is for the default settings")
                about = gr.Markdown(app.model_markdown(first))
                if warning:
                    gr.Markdown(warning)
                sampler = gr.Radio(list(SAMPLERS), value=first_sampler, label="Sampler", elem_id="sampler",
                                   info="DDPM: ancestral (all T steps = Algorithm 2; fewer = a respaced chain); "
                                        "DDIM: deterministic; EDM: stochastic Heun; DPM-Solver++: ODE, for "
                                        "well-trained models")
                steps = gr.Slider(1, max(i["T"] for i in infos.values()), value=first_steps,
                                  step=1, label="Steps", info="network calls per image (EDM: Heun takes two a step), at most T")
                n = gr.Slider(1, MAX_IMAGES, value=DEFAULT_IMAGES, step=1, label="Images")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                class_name = gr.Dropdown([ALL_CLASSES, *(first["class_names"] or [])], value=ALL_CLASSES,
                                         label="Class", visible=conditional, allow_custom_value=True)
                guidance = gr.Slider(0, MAX_GUIDANCE, value=first_w, step=0.5, visible=conditional,
                                     label="Guidance w", elem_id="guidance", info="classifier-free guidance; 0 = none")
                interval = gr.Checkbox(first_interval, visible=bool(first_band), label=interval_label(first_band),
                                       info="Kynkäänniemi et al. 2024: w = 0 outside the band, one network call there")
                best = gr.Button("Best measured sampling", size="sm", visible=bool(first["best"]), elem_id="best",
                                 variant="secondary")
                estimate = gr.Markdown(elem_id="estimate")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("Press Generate.", elem_id="status")
                with gr.Row():
                    xt = gr.Image(label="x_t (current sample)", format="png", interactive=False, elem_id="xt")
                    x0 = gr.Image(label="x̂_0 (the model's current guess)", format="png", interactive=False,
                                  elem_id="x0")
                final = gr.Image(label="Result", format="png", interactive=False, elem_id="final")
                download = gr.DownloadButton("Download PNG", elem_id="download")

        settings = [model, sampler, steps, n, class_name, guidance, interval]
        shared = dict(concurrency_limit=1, concurrency_id="model")   # timing and sampling take turns
        on_model = dict(fn=app.on_model_change, inputs=[model],
                        outputs=[about, sampler, steps, guidance, interval, class_name, best])
        demo.load(**on_model, api_name="model_info").then(app.estimate, settings, estimate, api_name="estimate",
                                                            **shared)
        model.change(**on_model, api_name=False).then(app.estimate, settings, estimate, api_name=False, **shared)
        for event in (sampler.change, class_name.change, steps.release, n.release, guidance.release, interval.change):
            event(app.estimate, settings, estimate, trigger_mode="always_last", api_name=False, **shared)
        best.click(app.on_best, [model], [sampler, steps, guidance, interval], api_name="best").then(
            app.estimate, settings, estimate, api_name=False, **shared)
        button.click(app.generate, [model, sampler, steps, seed, n, class_name, guidance, interval],
                     [xt, x0, final, download, status], api_name="generate", **shared)
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def port_number(text):
    """--port's type: a whole number in 1 … 65535, else argparse's one-line error."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number: use a whole number 1 … 65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range: use a port 1 … 65535 (default 7860)")
    return port


def check_port(host, port):
    """SystemExit in one line unless this process can serve on host:port (before any model is loaded)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SystemExit(f"error: --host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1, "
                         "0.0.0.0 or this machine's name") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the server will: TIME_WAIT is no refusal
        try:
            s.bind(address)
        except OSError as e:
            busy = e.errno == errno.EADDRINUSE
            raise SystemExit(f"error: --port {port} on {host}: "
                             + ("already in use (another app.py?); stop it or pass another --port, e.g. --port "
                                f"{port + 1 if port < 65535 else 7860}" if busy else
                                f"cannot serve there ({e.strerror}); pass another --host or --port")) from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", metavar="PATH",
                        help="an EMA checkpoint to offer (repeatable); without it, the shipped models in "
                             "pretrained/ and every *_ema.pt in --ckpt-dir")
    parser.add_argument("--ckpt-dir", default=CKPT_DIR,
                        help="folder searched for *_ema.pt without --ckpt (default: %(default)s)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: %(default)s, this machine only); 0.0.0.0 for the network")
    parser.add_argument("--port", type=port_number, default=7860, help="port to serve on, 1 … 65535 (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = parser.parse_args(argv)
    check_port(args.host, args.port)
    if args.threads is not None:
        set_threads(args.threads)

    device = pick_device(args.device)
    paths = discover_checkpoints(args.ckpt_dir, args.ckpt)
    print(f"app.py: device {device}, threads {torch.get_num_threads()}, http://{args.host}:{args.port}, checkpoints "
          f"{[str(p) for p in paths] or f'none in {args.ckpt_dir}/ (the page explains how to train one)'}")
    demo = build_demo(paths, device, ckpt_dir=args.ckpt_dir)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
