r"""Coarse localizer: C1-C7 on the whole scan at low resolution (pass 1 of the localizer).

  python -m cspine_jax.train --config=configs/localizer_coarse.py --workdir=WC \
      --config.data.root=CONVERTED                                  # ~24 min on 2 CPU cores
  then configs/localizer.py with --config.localizer.coarse_workdir=WC (pass 2), whose crop it
  places. Alone it is a one-pass localizer (`data_tools.localize --workdir=WC` works).

The whole scanned volume is stretched onto a 64^3 grid (per-axis spacing = extent / 64: ~2.5 mm
on the synthetic 64x64-pixel studies), two HU windows, through a small 3D ViT (4x8x8-voxel
patches, 1024 tokens) and the per-voxel decoder of cspine_jax/models/segmenter.py (each voxel's
3^3 neighbourhood of intensities + 16 features unshuffled from its token); softmax
cross-entropy + 3 x soft Dice + a token-level loss (each token predicts its patch's label
histogram). Trains on the studies with true masks (data.require_segmentation), fold 0 of 5 held
out for the periodic eval. ~1.15 s/step at batch 2 on 2 cores.

This is the first localizer, unchanged, now the first of two passes. Measured alone (README
"Two stages"): full-grid Dice 0.911 on the demo's 14 held-out masks, but 0.28 on
`data_tools.synthetic --variant=shifted` studies: stretched, the spine's size on its grid
follows each scan's field of view and length. As a coarse pass only the centre of its C1-C7
box matters (error on the shifted validation studies: median 7 mm in z, at most 22).
`data.volume_spacing_mm=(6, 6, 6)` with input_shape (48, 48, 48) gives a fixed physical grid
instead (288 mm each way); measured as the coarse pass (1500 steps, z zoom 20%; README), its
centre was worse (median 10 mm, at most 28) and so was the localizer it placed on the standard
studies (0.787 against 0.926), though better on the shifted ones (0.602 against 0.504).
Trained with scans cut shorter (`data.augment.fov_cut_prob=0.5`) and 15% zooms (1200 steps), its
centre was worse on both validation sets (up to 24 mm off on the shifted ones; the localizer it
placed 0.595 / 0.492 against 0.815 / 0.533): stretched, a cut scan also changes the spine's size.

History on the demo data (full-grid Dice): 48^3 grid, 8^3 patches, no context, nearest
upsampling, 900 steps: 0.69 (it drew the cortical rim, not the interior); 4x8x8 patches, 3^3
context, token loss: 0.768, linear probabilities 0.823, split vertebrae kept 0.828; the grid was
the limit (the true masks taken to 48^3 and back score 0.807 against themselves, 64^3 0.99);
(48, 64, 64) 0.874; this 64^3 config 0.911. With lr 1e-3 and Dice weight 1 it predicted
background everywhere for the first hundreds of steps.
"""
from configs import common


def get_config():
  config = common.localizer(common.get_config())
  d = config.data
  d.crop_mode = 'volume'
  d.input_shape = (64, 64, 64)
  d.volume_spacing_mm = ()  # the whole scan stretched onto the grid
  d.augment.jitter_mm = (4.0, 4.0, 4.0)
  d.augment.rotate_deg = 8.0
  d.augment.scale = 0.08
  config.batch_size = 2  # 64^3 volumes: batch 2 keeps a step ~1.15 s on 2 cores
  config.total_steps = 1200
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 400
  return config
