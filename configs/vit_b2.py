"""Seed run B2 (the seed's best): as B1 with dropout 0.1.

  python -m cspine_jax.train --config=configs/vit_b2.py --workdir=/tmp/vit_b2 \
      --config.data.root=/data/rsna_converted

The seed paper ("3D ViT - 1/3e-4/0.1", its best) reports train/val BCE
0.4169 / 0.4158 on its own split of the 86 segmented studies; expect the
fold's val BCE in that range, below B1's. Dropout 0.1 is applied as in
vit_pytorch's ViT(dropout=0.1, emb_dropout=0.1): attention weights, MLP
hidden, both residual branches and the embeddings. Runtime as B1, crops made
on the device from the 1 mm level as B1 (configs/vit_b1.py).
"""

from configs import common


def get_config():
  config = common.seed_vit(common.get_config(), dropout=0.1)
  config.total_steps = 10_000
  return config
