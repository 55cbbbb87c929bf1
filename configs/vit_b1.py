"""Seed run B1: 3D ViT, 12 layers, batch 1, lr 3e-4, dropout 0.0, BCE.

  python -m cspine_jax.train --config=configs/vit_b1.py --workdir=/tmp/vit_b1 \
      --config.data.root=/data/rsna_converted

The seed paper (Tables I-II, "3D ViT - 1/3e-4/0.0") reports train/val BCE
0.4893 / 0.4879 on its 70/14 split of the 86 segmented studies; the
comparable number here is the fold's val BCE (different split, so expect the
same range, not the same digits). Model and input: `common.seed_vit`
(ViT-Base width, 1024 tokens of 8x16x16 voxels over a 128^3 crop at
1.25x1x1 mm). 10k steps at batch 1 is ~140 passes over ~70 training
studies; one step is ~0.65 TFLOP, a few ms of an H200, so the crops are made
on the device (data.crop_on='device': the host ships int16 blocks of the
converter's 1 mm level, ~12-18 CPU-ms each, and the step resamples and
augments them; a dataset converted before levels existed needs
`python -m data_tools.levels --data=...` first); on the 2-core CPU a step
takes minutes (use bench_cpu.py there). Check the feed on a GPU with
`python -m cspine_jax.bench accelerator --accelerator_configs=vit_b1`.
"""

from configs import common


def get_config():
  config = common.seed_vit(common.get_config(), dropout=0.0)
  config.total_steps = 10_000
  return config
