"""Train a DDPM on MNIST digits (28×28 grey); on a 2-core CPU, recognisable digits in 15 minutes.

    DDPM_DATA=../shared/data python train_mnist.py --max-minutes 15
    python generate.py --ckpt checkpoints/mnist_ema.pt          # then sample from it
"""

import trainer

DEFAULTS = dict(
    dataset="mnist",
    class_cond=False,  # the paper's unconditional model: 15 CPU minutes give clean digits (DDPM sampler); with
                       # --class-cond each digit lands in its column, but many come out on grey backgrounds
    base_channels=16, channel_mults=[1, 2, 4], num_res_blocks=1,   # 16/32/64 channels at 28/14/7 px
    attn_resolutions=[], dropout=0.0,                              # (the middle block has attention)
    timesteps=1000, schedule="linear",
    loss_weighting="min_snr", min_snr_gamma=5.0,                   # Min-SNR-γ: won the 15-minute comparison
    batch_size=128, lr=2e-3, warmup_steps=100,                     # lr: peak; warmup: steps (batch 64: worse)
    ema_decay=0.999, ema_warmup=True,                              # ~1k-step horizon, short warmup
    steps=20_000, log_every=50, sample_every=1000, save_every=500,  # steps (a grid costs ~10 s of training)
)


def main(argv=None):
    trainer.main(DEFAULTS, argv, description=__doc__)


if __name__ == "__main__":
    main()
