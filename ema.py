"""Exponential moving average of a model's weights (Polyak averaging, as DDPM samples with).

    θ_ema ← d·θ_ema + (1 − d)·θ            after every optimiser step

With warmup, the decay grows with the number of updates n (Tensorflow's ExponentialMovingAverage
with num_updates): d_n = min(decay, (1 + n) / (10 + n)), so early weights, which are far from any
good model, are forgotten quickly. Warmup reaches the decay d itself only after
n = (10d − 1)/(1 − d) updates (8,990 for 0.999, 17,990 for 0.9995): before that every decay above
the warmup curve gives the same average. Buffers (e.g. running statistics) are copied, not averaged.
"""

import math

import torch


def warmup_reaches(decay):
    """The first update count n at which warmup's (1 + n)/(10 + n) is no longer below `decay`."""
    return max(0, math.ceil((10 * decay - 1) / (1 - decay) - 1e-6))


class EMA:
    def __init__(self, model, decay=0.9999, warmup=False):
        if not 0.0 <= decay < 1.0:       # d = 1 would never move θ_ema from the initial weights
            raise ValueError(f"EMA decay must be in [0, 1) (0.9999 ≈ a 10k-step average), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}
        self.param_names = {name for name, _ in model.named_parameters()}

    def current_decay(self):
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model, keep=None):
        """One step of θ_ema ← d·θ_ema + (1 − d)·θ. keep: an optional 0-d bool tensor on the
        device; where it is False the average does not move (a skipped step), decided on the
        device without a host synchronisation. The update count advances either way."""
        d = self.current_decay()
        self.num_updates += 1
        state = model.state_dict()
        averaged = [k for k in state if k in self.param_names and state[k].is_floating_point()]
        theta_ema, theta = [self.shadow[k] for k in averaged], [state[k].detach().float() for k in averaged]
        weight = 1.0 - d if keep is None else (1.0 - d) * keep.float()
        # One fused multi-tensor kernel (torch.optim's own fast path), not one launch per tensor.
        torch._foreach_lerp_(theta_ema, theta, weight)                    # θ_ema += (1 − d)·(θ − θ_ema)
        for k in state.keys() - set(averaged):
            self.shadow[k].copy_(state[k])                                # buffers: copied

    @torch.no_grad()
    def copy_to(self, model):
        """Write the averaged weights into model (same architecture)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def to(self, device):
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self):
        """Only what changes while training: the shadow weights and the update count. The decay and
        the warmup are settings, given to the constructor (a resumed run uses the flags it prints)."""
        return {"num_updates": self.num_updates, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state):
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state is missing {len(missing)} tensors (e.g. {sorted(missing)[:3]}); "
                           "was it saved from a different architecture?")
        self.num_updates = state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
