"""Shared config skeleton; experiment configs start from `get_config()` here.

Not an experiment itself. Keys (all read by the training/eval code):

  seed                       PRNG seed (parameters, data order, dropout).
  data.root                  output folder of `python -m data_tools.convert`.
  data.input_shape           (z, y, x) voxels of the crop fed to the model
                             (region and localizer configs).
  data.vertebra_shape        the same for per-vertebra configs (each of the
                             seven crops); `per_vertebra` swaps the keys.
  data.spacing_mm            (dz, dy, dx) the crop is resampled to.
  data.windows               HU windows (center, width), one per input
                             channel, each mapped to [0, 1].
  data.*                     every key of cspine_jax/data/config.py (crop
                             mode, augmentation, threads, cache...), with
                             its defaults, so any can be set from the
                             command line (--config.data.augment.rotate_deg=5).
  data.fold, data.num_folds  cross-validation split (by study).
  batch_size                 global batch size.
  total_steps, log_every_steps, eval_every_steps, checkpoint_every_steps
  optimizer.*                name ("adamw"), lr (peak), weight_decay,
                             warmup_steps (linear), schedule ("cosine" |
                             "constant" after warm-up), grad_clip_norm (0 =
                             off), b1, b2.
  loss                       "bce" | "rsna_weighted" (cspine_jax/losses.py).
  model.*                    `name` picks the backbone and `mode` the task
                             (cspine_jax/models/factory.py: MODELS, TASKS);
                             every other key is a constructor argument.

The crop shape is one key, the one the task's table entry names
(factory.TASKS[mode].shape_key): `model.input_shape` is a reference to it, so
`--config.data.input_shape` (or `data.vertebra_shape` in per-vertebra configs)
also resizes the model, and the other mode's key is not in the config at all
(setting it fails instead of doing nothing). `model.in_channels` must equal
len(data.windows): configs that change the windows set both.
"""

from ml_collections import config_dict

from cspine_jax.data import config as data_config

# Bone window (center 400, width 1800: -500..1300 HU): cortical bone and fracture lines.
BONE_WINDOW = (400.0, 1800.0)


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.seed = 0

  config.data = data_config.get_config()  # every pipeline key, documented there
  # The batch size and seed are the top-level keys (config.batch_size, config.seed): the
  # pipeline takes them from there (data_config.resolve), so one override changes both the
  # model's step and the data. Left in the data block, the pipeline's defaults won silently.
  for key in ('batch_size', 'eval_batch_size', 'seed'):
    del config.data[key]
  # The crop shape of a region (or localizer) config is data.input_shape; per_vertebra swaps.
  del config.data['vertebra_shape']
  config.data.root = ''
  config.data.input_shape = (128, 128, 128)
  config.data.spacing_mm = (1.25, 1.0, 1.0)
  config.data.windows = (BONE_WINDOW,)
  config.data.fold = 0
  config.data.num_folds = 5

  config.batch_size = 8
  config.total_steps = 10_000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 1_000
  # Checkpoints kept (checkpoint.py): the latest N, plus the best N by eval RSNA score (kept
  # across restarts; `cspine_jax.eval --checkpoint=best` reads them).
  config.keep_latest_checkpoints = 2
  config.keep_best_checkpoints = 1
  # > 1: the global batch is split into this many micro-batches inside the step (memory), their
  # gradients weighted by valid examples so the update equals the full batch's.
  config.grad_accum_steps = 1
  # > 0: an exponential moving average of the weights, used by eval, predict and distillation.
  config.ema_decay = 0.0
  # "replicate" (every device holds all parameters) | "fsdp" (parameters of >= 2^18 elements
  # split over the devices along their largest divisible axis; parallel.param_sharding).
  config.param_sharding = 'replicate'

  config.optimizer = config_dict.ConfigDict()
  config.optimizer.name = 'adamw'
  config.optimizer.lr = 3e-4
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_steps = 500
  config.optimizer.schedule = 'cosine'
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999

  config.loss = 'bce'
  # Classification targets eps/2 and 1 - eps/2 (train_lib): calibration on small data.
  config.label_smoothing = 0.0
  # > 0: mixup of whole studies in the train step, l ~ Beta(a, a) (train_lib.mixup).
  config.mixup_alpha = 0.0
  # The localizer's loss (task "segment", configs/localizer.py): soft-Dice weight beside the
  # voxel cross-entropy, and the patch tokens' label-histogram term (0 = off).
  config.dice_weight = 1.0
  config.token_loss_weight = 0.0
  # A localizer that crops around the spine (configs/localizer.py, data.crop_mode='region')
  # runs after a coarse one over the whole scan (configs/localizer_coarse.py): its workdir.
  config.localizer = config_dict.ConfigDict()
  config.localizer.coarse_workdir = ''

  config.model = config_dict.ConfigDict()
  config.model.name = 'vit3d'
  config.model.mode = 'region'  # the task: region | vertebra | segment (factory.TASKS)
  config.model.input_shape = config.data.get_ref('input_shape')
  config.model.in_channels = 1
  config.model.patch_size = (16, 16, 16)
  # 3^3 convolution widths before the patch embedding (a hybrid ViT; empty: plain patches).
  config.model.conv_stem = ()
  config.model.width = 384
  config.model.depth = 6
  config.model.num_heads = 6
  config.model.mlp_dim = 1536
  config.model.head_dim = None
  config.model.pos_embedding = 'sincos'
  config.model.pool = 'cls'
  config.model.patient_head = 'logit'
  config.model.distill_token = False
  # > 0: a linear map of the patch tokens to this many channels, the student's side of feature
  # distillation (the teacher CNN's last width; configs/vertebra_distill.py).
  config.model.hint_dim = 0
  config.model.patch_embed_norm = False
  config.model.qkv_bias = True
  config.model.dropout = 0.0
  config.model.attention_dropout = 0.0
  config.model.emb_dropout = 0.0
  config.model.drop_path = 0.0
  config.model.norm_epsilon = 1e-6
  config.model.gelu_approximate = False
  config.model.head_zero_init = True
  config.model.head_bias_init = 'prior'
  config.model.attention = 'full'
  # How attention is computed (cspine_jax/models/layers.py, ATTENTION_IMPLS): 'xla'
  # (jax.nn.dot_product_attention), 'cudnn' (its cuDNN flash attention: GPU, bf16/fp16; the XLA
  # path elsewhere) or 'einsum' (the plain path; also taken whenever attention dropout is
  # active). Same parameters whichever: a run may resume with another value.
  config.model.attention_impl = 'xla'
  config.model.deformable_layers = None
  config.model.deformable = None
  config.model.dtype = 'float32'
  config.model.param_dtype = 'float32'
  config.model.remat = False
  config.model.remat_policy = 'nothing_saveable'
  config.model.scan_layers = False
  return config


def seed_vit(config: config_dict.ConfigDict, dropout: float
             ) -> config_dict.ConfigDict:
  """The seed paper's 3D ViT (its Tables I-II), in vit_pytorch's layout.

  The seed describes vit_pytorch's `vit_3d.ViT` (CLS token, learned position
  code, one `dropout` for attention and MLP, 12 layers; its Fig. 4 says
  "Simple ViT", but that model has neither a CLS token nor dropout), so the
  layout options mirror it (tests/test_vit_reference.py checks the mirror).
  The seed gives no width: ViT-Base (768 wide, 12 heads of 64, MLP 3072) is
  the choice, the usual companion of 12 layers. Input: the cervical crop at
  (1.25, 1, 1) mm, 128^3 voxels = 160 x 128 x 128 mm (C1-C7 span ~12-14 cm);
  patches of 8 x 16 x 16 voxels (10 x 16 x 16 mm, a vertebral body is
  ~15 mm high, so ~1.5 tokens per vertebra along z) -> 16 x 8 x 8 = 1024
  tokens. Optimizer as the seed (Adam, constant 3e-4, batch 1, BCE): AdamW
  with weight decay 0, no warm-up, no clipping.
  """
  config.batch_size = 1
  config.loss = 'bce'
  config.optimizer.lr = 3e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = 'constant'
  config.optimizer.grad_clip_norm = 0.0

  m = config.model
  m.patch_size = (8, 16, 16)
  m.width = 768
  m.depth = 12
  m.num_heads = 12
  m.head_dim = 64
  m.mlp_dim = 3072
  m.pos_embedding = 'learned'
  m.pool = 'cls'
  m.patch_embed_norm = True
  m.qkv_bias = False
  m.norm_epsilon = 1e-5
  m.dropout = dropout
  m.attention_dropout = dropout
  m.emb_dropout = dropout
  # bf16 compute on accelerators, float32 parameters (big_vision / MaxText).
  m.dtype = 'bfloat16'
  # The crops are resampled and augmented in the jitted step from int16 blocks of the 1 mm level
  # (cspine_jax/device_crop.py): the host's cores alone could feed ~5% of one GPU's appetite.
  config.data.crop_on = 'device'
  # Random region crops of thousands of studies rarely revisit a chunk: a chunk cache only costs
  # its bookkeeping (0.022 vs 0.018 CPU-s per crop on the pipeline benchmark).
  config.data.cache_mb = 0
  return config


def localizer(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """What both localizer passes share (configs/localizer_coarse.py, configs/localizer.py): two HU
  windows, true masks only, fold 0 of 5 for the periodic eval, the loss and the small ViT +
  per-voxel decoder of cspine_jax/models/segmenter.py. Each pass sets its crop, augmentation and
  schedule."""
  d = config.data
  d.windows = (BONE_WINDOW, (50.0, 400.0))
  d.require_segmentation = True  # a localizer learns from true masks only
  d.fold = 0
  d.num_folds = 5
  d.num_threads = 2
  d.prefetch = 2
  d.cache_mb = 128
  config.log_every_steps = 20
  config.loss = 'ce_dice'
  # Dice weight 3, lr 3e-3: with 1 and 1e-3 the background-dominated CE kept every voxel at
  # background for the first hundreds of steps (held-out Dice 0.0 at step 160).
  config.dice_weight = 3.0
  config.token_loss_weight = 1.0  # each patch token predicts its patch's label histogram
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.01
  m = config.model
  m.mode = 'segment'
  m.in_channels = 2
  # 4 x 8 x 8 voxels (~10 x 20 x 20 mm on the demo data): a token is at most one level tall.
  m.patch_size = (4, 8, 8)
  m.width = 128
  m.depth = 4
  m.num_heads = 4
  m.mlp_dim = 256
  m.decoder_features = 16
  m.decoder_hidden = 32
  m.context = 1  # the decoder sees each voxel's 3^3 neighbourhood of intensities
  return config


def per_vertebra(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Per-vertebra crops and a short CPU schedule (configs/vertebra.py, configs/cnn_vertebra.py).

  Seven 16 x 24 x 24 crops at 2 mm (32 x 48 x 48 mm: a vertebra and its neighbours' edges), one
  per vertebra from the true boxes (masks) or the localizer's predicted ones: training uses every
  labelled study that has either (``data.require_boxes``). Plain BCE, AdamW 1e-3 with warm-up and cosine decay.
  """
  d = config.data
  d.crop_mode = 'vertebrae'
  # The crop shape is data.vertebra_shape (factory.TASKS['vertebra']); the model follows it.
  del config.model['input_shape'], d['input_shape']
  d.vertebra_shape = (16, 24, 24)
  config.model.input_shape = d.get_ref('vertebra_shape')
  config.model.mode = 'vertebra'
  config.model.patient_head = 'noisy_or'
  d.vertebra_spacing_mm = (2.0, 2.0, 2.0)
  # Each crop is that vertebra's box (from the mask) plus 3 mm, stretched onto the crop shape:
  # a fixed-spacing crop tall enough for C2 shows the neighbours' fractures too (label noise).
  d.vertebra_fit_to_box = True
  d.vertebra_margin_mm = 3.0
  d.augment.jitter_mm = (2.0, 2.0, 2.0)
  d.augment.rotate_deg = 5.0
  # Every labelled study with vertebra boxes: true ones from a mask, else the localizer's
  # (`python -m data_tools.localize`); without a localizer run that is the segmented studies.
  d.require_boxes = True
  d.fold = -1  # train on every labelled study; evaluate on a separate held-out set
  d.num_threads = 2
  d.prefetch = 2
  d.cache_mb = 128
  config.batch_size = 8
  config.total_steps = 400
  config.log_every_steps = 20
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 200
  # Plain BCE: with the RSNA weights (patient 7-14 of ~14-21) the gradient flows mostly through
  # the noisy-OR patient logit, which spreads blame over all seven vertebrae; on the demo data a
  # per-vertebra ViT then stayed at the constant's score (0.56 vs 0.54) where BCE reached 0.47.
  config.loss = 'bce'
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 40
  config.optimizer.weight_decay = 0.05
  return config
