r"""Demo: a model that learns the synthetic fractures in a few CPU minutes (README main command).

  python -m cspine_jax.demo --workdir=demo_out          # generates, converts, trains, evaluates
  python -m cspine_jax.train --config=configs/demo.py --workdir=W --config.data.root=CONVERTED

Per-vertebra mode: seven 16x24x24 crops at 2 mm (one per vertebra, from the masks) through a small
3D ViT with 4 mm patches, vertebra logits combined by noisy-OR into patient_overall. Trained on the
studies that have vertebra masks (a localizer removes that limit). Expect the held-out RSNA score
well below the constant-prevalence baseline (numbers in the README).
"""
from configs import common


def get_config():
  config = common.get_config()
  d = config.data
  d.crop_mode = 'vertebrae'
  d.vertebra_shape = (16, 24, 24)
  d.vertebra_spacing_mm = (2.0, 2.0, 2.0)
  d.input_shape = (16, 24, 24)
  d.require_segmentation = True
  d.num_folds = 5
  d.fold = -1  # train on every labelled study; evaluate on a separate held-out set
  d.num_threads = 2
  d.prefetch = 2
  d.cache_mb = 128
  config.batch_size = 8
  config.total_steps = 400
  config.log_every_steps = 20
  config.eval_every_steps = 0
  config.checkpoint_every_steps = 200
  config.loss = 'rsna_weighted'
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 40
  config.optimizer.weight_decay = 0.05
  m = config.model
  m.mode = 'vertebra'
  m.patient_head = 'noisy_or'
  m.patch_size = (4, 4, 4)
  m.width = 96
  m.depth = 4
  m.num_heads = 4
  m.mlp_dim = 192
  m.pool = 'mean'
  return config
