"""Train a DDPM on 64×64 faces: CelebA (202,599 faces), faces64.npz (4,800 of them) or any folder of faces.

    python train_celeba.py                                           # CelebA, from the data dir (below)
    DDPM_DATA=path/to/data python train_celeba.py                    # faces64.npz from the data dir
    DDPM_DATA=path/to/data python train_celeba.py --cpu --ckpt-dir ~/ddpm-faces --max-minutes 90      # on a CPU:
    DDPM_DATA=path/to/data python train_celeba.py --resume --ckpt-dir ~/ddpm-faces --max-minutes 90    # the 3-PFLOP
                                                                     # run, a sitting at a time (docs/faces.md)
    python train_celeba.py --dataset path/to/celeba_hq_images        # a folder: center-crop, resize to 64
    torchrun --nproc_per_node=4 train_celeba.py                      # several GPUs (DDP)

Without --dataset, the data dir (--data-dir, else $DDPM_DATA, else ./data) decides: CelebA where it
is there (the built celeba64_train.npz, or the official img_align_celeba.zip or its extracted
img_align_celeba/ folder, in <data dir>/celeba/ or the data dir itself); else faces64.npz, the build
machines' offline copy, where that is there; else torchvision downloads CelebA into <data dir>/celeba/.
The first run crops CelebA once (140×140 centred at (89, 121), where DDIM's 128×128 crop is centred, resized to 64)
into celeba64_train.npz / celeba64_test.npz beside it: CelebA's own partition, 162,770 training and
19,962 test faces (its 19,867 'valid' faces are not used).

The model is the DDPM CIFAR-10 U-Net (35.52M parameters) one level deeper in resolution; the DDIM
paper's CelebA model widens the last level to 4× (68.6M), which 4,800 faces cannot feed; dropout
and flips keep it from memorising them too soon.
"""

import argparse

import trainer
from plumbing import data

DEFAULTS = dict(
    dataset="celeba", run_name="celeba", image_size=64, flip=True,        # px; random horizontal flips
    base_channels=128, channel_mults=[1, 2, 2, 2], num_res_blocks=2,    # 64 -> 32 -> 16 -> 8 px
    attn_resolutions=[16], dropout=0.1,                                  # attention at 16×16 px
    timesteps=1000, schedule="linear", objective="eps", variance="beta_tilde",
    batch_size=128, lr=2e-4, warmup_steps=5000,                          # lr: peak; warmup: steps
    ema_decay=0.9999, ema_warmup=False,                                  # per step
    steps=200_000, log_every=100, sample_every=5000, save_every=5000,    # steps
)


# The CPU recipe (docs/faces.md, "Where the FLOPs go"): the FLOPs go to 16×16 and 8×8 (16 channels at 64×64), the
# parameters to 8×8 and 4×4, and training's noise levels up by ln 2 for 64 px; each choice measured by short
# runs at equal PFLOP.
CPU = dict(base_channels=16, channel_mults=[1, 2, 4, 8, 8], num_res_blocks=1, attn_resolutions=[16],  # 1.05 GFLOP
           dropout=0.1, objective="v", schedule="cosine", t_sampling="lognormal", lognormal_mean=-0.5,
           loss_weighting="simple", batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="linear",
           ema_decay=0.999, ema_warmup=True, max_pflop=3.0, steps=10_000_000,
           log_every=50, sample_every=2500, save_every=500)

PRESETS = {
    "cpu": (CPU, "the CPU recipe: a 4.1M-parameter, 1.05-GFLOP v-model (base 16, mults 1,2,4,8,8: 16 channels "
                 "at 64×64, 128 at 8×8 and 4×4), EDM's log-normal noise levels shifted up for 64 px (ln σ mean "
                 "−0.5), lr 1e-3 decayed to 0 over a 3-PFLOP budget (about 5 h of a 2-core CPU, in as many "
                 "sittings as you like: --max-minutes, then --resume)"),
}


def main(argv=None):
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir")
    data_dir = where.parse_known_args(argv)[0].data_dir
    defaults = dict(DEFAULTS, dataset=data.celeba_default(data_dir))     # "celeba", or "faces" (faces64.npz)
    trainer.train(defaults, argv, PRESETS, description=__doc__)


if __name__ == "__main__":
    main()
