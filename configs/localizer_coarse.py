r"""Coarse localizer: where the spine is in the whole scan, at one fixed physical scale (pass 1).

  python -m cspine_jax.train --config=configs/localizer_coarse.py --workdir=W_COARSE \
      --config.data.root=CONVERTED
  then configs/localizer.py with --config.localizer.coarse_workdir=W_COARSE (pass 2).

The whole scan is sampled on a 48^3 grid of 6 mm voxels centred on the volume's centre (288 mm
each way: a neck CT's field of view and length fit; more is padded air), two HU windows, through
the same small ViT + per-voxel decoder as the fine pass. Only where it puts the spine matters:
configs/localizer.py crops a fixed-size box around the centre of its C1-C7 labels, and recentres
on its own labels once. The grid has a fixed spacing, not the scan stretched onto it (the first
localizer's design): stretched, the spine's size on the grid followed the field of view and
slice count, and a localizer trained on 150-185 mm fields of view reached Dice 0.28 on scans of
130-230 mm (README "Two stages"). Strong spatial augmentation (jitter 30/20/20 mm, zoom +-20%
and +-20% more along z alone, rotation 10 degrees) covers where the neck sits in the field of
view, the anatomy's size and its proportions. Its centre error (the box of its labels against
the true C1-C7 box), chosen on validation studies: median 10 mm in z (max 23-28) on both the
standard training studies and the shifted validation set; 500 steps without the z zoom: 5-12
(max 16-28). On 2 CPU cores: ~0.4 s/step at batch 4, 1500 steps ~10 min.
"""
from configs import common


def get_config():
  config = common.get_config()
  d = config.data
  d.crop_mode = 'volume'
  d.input_shape = (48, 48, 48)
  d.volume_spacing_mm = (6.0, 6.0, 6.0)
  d.windows = (common.BONE_WINDOW, (50.0, 400.0))
  d.require_segmentation = True  # a localizer learns from true masks only
  d.fold = 0
  d.num_folds = 5
  d.augment.jitter_mm = (30.0, 20.0, 20.0)
  d.augment.rotate_deg = 10.0
  d.augment.scale = 0.2
  d.augment.scale_z = 0.2  # taller and shorter necks, discs and slices
  d.num_threads = 2
  d.prefetch = 2
  d.cache_mb = 128
  config.batch_size = 4
  config.total_steps = 1500
  config.log_every_steps = 20
  config.eval_every_steps = 750
  config.checkpoint_every_steps = 750
  config.loss = 'ce_dice'
  config.dice_weight = 3.0
  config.token_loss_weight = 1.0
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.01
  m = config.model
  m.mode = 'segment'
  m.in_channels = 2
  m.patch_size = (4, 8, 8)
  m.width = 128
  m.depth = 4
  m.num_heads = 4
  m.mlp_dim = 256
  m.decoder_features = 16
  m.decoder_hidden = 32
  m.context = 1
  return config
