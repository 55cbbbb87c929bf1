r"""Localizer: segments C1-C7 on the whole scan at low resolution (stage 1 of the two-stage flow).

  python -m cspine_jax.train --config=configs/localizer.py --workdir=W --config.data.root=CONVERTED
  python -m cspine_jax.eval --workdir=W --data=CONVERTED_HELDOUT --split=all   # per-vertebra Dice
  python -m data_tools.localize --workdir=W --data=CONVERTED    # predicted masks + boxes

The whole scanned volume is stretched onto 64^3 voxels (per-axis spacing = extent / 64: ~2.4-2.8
mm on the synthetic 64x64 studies; raise data.input_shape for real 512x512 scans, whose field of
view is ~250-400 mm), two HU windows, through a small 3D ViT (8^3-voxel patches, 512 tokens) and
the per-voxel decoder of cspine_jax/models/segmenter.py; softmax cross-entropy + soft Dice. Trains
on the studies with true masks (data.require_segmentation), fold 0 of 5 held out for the periodic
eval (Dice per vertebra at the localizer's resolution). On 2 CPU cores: ~0.5 s/step at batch 4.
Measured on the demo data (23 segmented training studies): with lr 1e-3 and Dice weight 1 the
held-out Dice stayed 0.0 after 160 steps; with lr 3e-3 and Dice weight 3 (these defaults) it
rises slowly: mean 0.11 at step 150, 0.29 at step 300 (C1 still 0). Far from the 0.90 goal:
more steps and token-level supervision are the next things to try (README "Two stages").
"""
from configs import common


def get_config():
  config = common.get_config()
  d = config.data
  d.crop_mode = 'volume'
  d.input_shape = (48, 48, 48)
  d.windows = (common.BONE_WINDOW, (50.0, 400.0))
  d.require_segmentation = True  # a localizer learns from true masks only
  d.fold = 0
  d.num_folds = 5
  d.augment.jitter_mm = (4.0, 4.0, 4.0)
  d.augment.rotate_deg = 8.0
  d.augment.scale = 0.08
  d.num_threads = 2
  d.prefetch = 2
  d.cache_mb = 128
  config.batch_size = 4
  config.total_steps = 300
  config.log_every_steps = 20
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.loss = 'ce_dice'
  # Dice weight 3, lr 3e-3: with 1 and 1e-3 the background-dominated CE kept every voxel at
  # background for the first hundreds of steps (held-out Dice 0.0 at step 160).
  config.dice_weight = 3.0
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.01
  m = config.model
  m.mode = 'segment'
  m.in_channels = 2
  m.patch_size = (8, 8, 8)
  m.width = 128
  m.depth = 4
  m.num_heads = 4
  m.mlp_dim = 256
  m.decoder_features = 8
  m.decoder_hidden = 16
  return config
