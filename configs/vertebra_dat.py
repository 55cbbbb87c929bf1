r"""The per-vertebra ViT with deformable attention (DAT) in its last two layers.

  python -m cspine_jax.train --config=configs/vertebra_dat.py --workdir=W \
      --config.data.root=CONVERTED

configs/vertebra.py (seven 16x24x24 crops, 4^3 patches: a 4x6x6 token grid) with layers 2 and 3
deformable, as configs/vit_b2_dat.py does for the whole-region model: keys sampled on a grid 2x
coarser per axis (2x3x3 = 18 keys per offset group), offsets from a 3^3 depthwise conv bounded to
+-2 tokens, relative position bias. Numbers on the demo data: README "Model comparison".
"""
from configs import vertebra


def get_config():
  config = vertebra.get_config()
  m = config.model
  m.attention = 'deformable'
  m.deformable_layers = (2, 3)
  m.deformable = dict(offset_groups=2, downsample=(2, 2, 2), offset_kernel=3,
                      offset_range_factor=2.0, use_rpe=True)
  return config
