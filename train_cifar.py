"""Train the DDPM CIFAR-10 model (Ho et al. 2020, appendix B): 35.52M parameters, 32×32 colour.

    DDPM_DATA=path/to/data python train_cifar.py                         # the paper's run (one GPU)
    DDPM_DATA=path/to/data torchrun --nproc_per_node=8 train_cifar.py    # the same on 8 GPUs (DDP)
    DDPM_DATA=path/to/data python train_cifar.py --cpu --ckpt-dir ~/ddpm-cifar --max-minutes 90     # on a CPU: the
    DDPM_DATA=path/to/data python train_cifar.py --resume --ckpt-dir ~/ddpm-cifar --max-minutes 90    # 5-PFLOP run, a
                                                                         # sitting at a time (docs/cifar10.md)
    DDPM_DATA=path/to/data python train_cifar.py --small --max-minutes 60     # a quick, smaller run
    python train_cifar.py --resume                                       # continue after a stop

The paper trained 800k steps at batch 128 on a TPU v3-8 (about 10.6 h); --batch-size is the
global batch, split over the DDP processes.
"""

import trainer

DEFAULTS = dict(
    dataset="cifar10", flip=True,                                          # random horizontal flips
    base_channels=128, channel_mults=[1, 2, 2, 2], num_res_blocks=2,      # 32 -> 16 -> 8 -> 4 px
    attn_resolutions=[16], dropout=0.1,                                    # attention at 16×16 px
    timesteps=1000, schedule="linear", objective="eps", variance="beta_tilde",   # β 1e-4 … 0.02
    batch_size=128, lr=2e-4, warmup_steps=5000,                            # lr: peak; warmup: steps
    ema_decay=0.9999, ema_warmup=False,                                    # per step
    steps=800_000, log_every=100, sample_every=5000, save_every=5000,      # steps
)

# The CPU recipe (docs/cifar10.md, "The recipe"): each choice measured by short runs at equal PFLOP.
CPU = dict(base_channels=32, channel_mults=[1, 2, 4, 4], num_res_blocks=1, attn_resolutions=[16],  # 0.81 GFLOP
           dropout=0.1, class_cond=True, objective="v", schedule="cosine",
           t_sampling="lognormal", loss_weighting="simple",
           batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="linear", ema_decay=0.999, ema_warmup=True,
           max_pflop=5.0, steps=10_000_000, log_every=50, sample_every=2000, sample_count=100, save_every=500)

PRESETS = {
    "cpu": (CPU, "the CPU recipe: a 4.2M-parameter, 0.81-GFLOP class-conditional v-model (base 32, mults "
                 "1,2,4,4), EDM's log-normal noise levels, lr 1e-3 decayed to 0 over a 5-PFLOP budget (about "
                 "8 h of a 2-core CPU, in as many sittings as you like: --max-minutes, then --resume)"),
    "small": (dict(base_channels=64, channel_mults=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16],
                   dropout=0.1, lr=5e-4, warmup_steps=500, ema_decay=0.999, ema_warmup=True,
                   steps=50_000, log_every=50, sample_every=2000, save_every=2000),
              ("a 4.4M-parameter model (base 64, mults 1,2,2, 1 res block), lr 5e-4, EMA 0.999 with warmup, "
               "50k steps: for quick runs, not the paper's model")),
}


def main(argv=None):
    trainer.train(DEFAULTS, argv, PRESETS, description=__doc__)


if __name__ == "__main__":
    main()
