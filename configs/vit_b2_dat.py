"""B2 with deformable attention (DAT, Xia et al. 2022) in the last 4 layers.

  python -m cspine_jax.train --config=configs/vit_b2_dat.py \
      --workdir=/tmp/vit_b2_dat --config.data.root=/data/rsna_converted

As DAT, the deformable layers are the late ones (DAT puts them in its last
two stages), where tokens carry semantics that can predict where to look.
Key grid 2x coarser per axis (16x8x8 tokens -> 8x4x4 = 128 sampled keys per
offset group), offsets from a 5^3 depthwise conv bounded to +-3 tokens (DAT
stage 3: stride 2, kernel 5, range factor 3), 4 offset groups of 3 heads,
relative position bias. Expected: val BCE at or below B2's at a slightly
lower cost per step (the deformable layers attend to 128 + 1 keys instead of
1025); the seed lists this model as an objective without results.
"""

from configs import vit_b2


def get_config():
  config = vit_b2.get_config()
  m = config.model
  m.attention = 'deformable'
  m.deformable_layers = (8, 9, 10, 11)
  m.deformable = dict(offset_groups=4, downsample=(2, 2, 2), offset_kernel=5,
                      offset_range_factor=3.0, use_rpe=True)
  return config
