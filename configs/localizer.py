r"""Localizer: segments C1-C7 on the whole scan at low resolution (stage 1 of the two-stage flow).

  python -m cspine_jax.train --config=configs/localizer.py --workdir=W --config.data.root=CONVERTED
  python -m data_tools.localize --workdir=W --data=CONVERTED    # predicted masks + boxes

The whole scanned volume is stretched onto a 64^3 grid (per-axis spacing = extent / 64: ~2.5 mm
on the synthetic 64x64-pixel studies, i.e. their own in-plane resolution; raise data.input_shape
for real 512x512 scans, whose field of view is ~250-400 mm: (128, 160, 160) is ~2 mm), two HU
windows, through a small 3D ViT (4x8x8-voxel patches, 1024 tokens) and the per-voxel decoder of
cspine_jax/models/segmenter.py (each voxel's 3^3 neighbourhood of intensities + 16 features
unshuffled from its token); softmax cross-entropy + 3 x soft Dice + a token-level loss (each
token predicts its patch's label histogram). Trains on the studies with true masks
(data.require_segmentation), fold 0 of 5 held out for the periodic eval (Dice per vertebra at the
localizer's resolution). `data_tools.localize` then interpolates the class probabilities
linearly onto each volume's own grid. On 2 CPU cores: ~1.15 s/step at batch 2, 1200 steps ~24 min.

Measured on the demo data (23 segmented training studies; held-out: the demo's 14 segmented
held-out studies, Dice of the written masks on the full grid; README "Two stages"):
  - first version (48^3 grid, 8^3 patches, no context, no token loss, nearest upsampling), 900
    steps: 0.69. It drew the bright cortical rim and left the cancellous interior out.
  - 48^3, 4x8x8 patches, 3^3 context, token loss, 900 steps at batch 4 (10.7 min): 0.768 with
    nearest upsampling, 0.823 with linear probabilities, 0.828 keeping the pieces of a split
    (fractured) vertebra; 0.841 at 1800 steps.
  - The grid was the limit: the *true* masks taken to 48^3 and back (nearest down, linear up)
    score only 0.807 against themselves; (48, 64, 64) 0.925; 64^3 0.99. The model at
    (48, 64, 64), batch 2, 1200 steps (13 min): 0.874.
  - this config (64^3, batch 2, 1200 steps, ~24 min): 0.911 (C1 0.88 ... C7 0.85).
A foreground threshold other than argmax (0.25-0.5) and left-right flip test-time averaging each
moved the Dice by < 0.005. With lr 1e-3 and Dice weight 1 it predicted background everywhere for
the first hundreds of steps.
"""
from configs import common


def get_config():
  config = common.get_config()
  d = config.data
  d.crop_mode = 'volume'
  # 64^3: the synthetic studies' own in-plane resolution (48^3 capped the Dice near 0.81).
  d.input_shape = (64, 64, 64)
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
  config.batch_size = 2  # 64^3 volumes: batch 2 keeps a step ~1.15 s on 2 cores
  config.total_steps = 1200
  config.log_every_steps = 20
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 400
  config.loss = 'ce_dice'
  # Dice weight 3, lr 3e-3: with 1 and 1e-3 the background-dominated CE kept every voxel at
  # background for the first hundreds of steps (held-out Dice 0.0 at step 160).
  config.dice_weight = 3.0
  # Each patch token also predicts its patch's label histogram (losses.token_label_loss).
  config.token_loss_weight = 1.0
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.01
  m = config.model
  m.mode = 'segment'
  m.in_channels = 2
  # 4 x 8 x 8 voxels (~10 x 20 x 20 mm on the demo data): a token is at most one level tall,
  # so "which vertebra" is a token's own question (8^3 tokens straddled two levels).
  m.patch_size = (4, 8, 8)
  m.width = 128
  m.depth = 4
  m.num_heads = 4
  m.mlp_dim = 256
  m.decoder_features = 16
  m.decoder_hidden = 32
  m.context = 1  # the decoder sees each voxel's 3^3 neighbourhood of intensities
  return config
