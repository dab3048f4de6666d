"""Train a DDPM on 64×64 faces: faces64.npz (4,800 CelebA faces) or any folder of face images.

    DDPM_DATA=../shared/data python train_celeba.py                  # faces64.npz from the data dir
    python train_celeba.py --dataset path/to/celeba_hq_images        # a folder: center-crop, resize to 64
    torchrun --nproc_per_node=4 train_celeba.py                      # several GPUs (DDP)

The model is the DDPM CIFAR-10 U-Net (35.52M parameters) one level deeper in resolution; the DDIM
paper's CelebA model widens the last level to 4× (68.6M), which 4,800 faces cannot feed; dropout
and flips keep it from memorising them too soon.
"""

import trainer

DEFAULTS = dict(
    dataset="faces", run_name="celeba", image_size=64, flip=True,        # px; random horizontal flips
    base_channels=128, channel_mults=[1, 2, 2, 2], num_res_blocks=2,    # 64 -> 32 -> 16 -> 8 px
    attn_resolutions=[16], dropout=0.1,                                  # attention at 16×16 px
    timesteps=1000, schedule="linear", objective="eps", variance="beta_tilde",
    batch_size=128, lr=2e-4, warmup_steps=5000,                          # lr: peak; warmup: steps
    ema_decay=0.9999, ema_warmup=False,                                  # per step
    steps=200_000, log_every=100, sample_every=5000, save_every=5000,    # steps
)


def main(argv=None):
    trainer.main(DEFAULTS, argv, description=__doc__)


if __name__ == "__main__":
    main()
