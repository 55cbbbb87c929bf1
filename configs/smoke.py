r"""Smoke config: a tiny 3D ViT for a few CPU steps (tests and quick checks).

  python -m data_tools.synthetic --output=/tmp/rsna --studies=8 --size=64
  python -m data_tools.convert --input=/tmp/rsna --output=/tmp/cspine
  python -m cspine_jax.train --config=configs/smoke.py --workdir=/tmp/smoke \
      --config.data.root=/tmp/cspine

Expect: 6 steps in well under a minute on 2 CPU cores; metrics.jsonl with 6 lines plus one eval;
checkpoints at steps 3 and 6. Not meant to learn anything.
"""
from configs import common


def get_config():
  config = common.get_config()
  config.data.input_shape = (16, 32, 32)
  config.data.spacing_mm = (8.0, 4.0, 4.0)
  config.data.num_folds = 4
  config.data.num_threads = 2
  config.data.prefetch = 1
  config.data.cache_mb = 32
  config.batch_size = 2
  config.total_steps = 6
  config.log_every_steps = 1
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 3
  config.optimizer.warmup_steps = 2
  m = config.model
  m.patch_size = (8, 8, 8)
  m.width = 32
  m.depth = 2
  m.num_heads = 2
  m.mlp_dim = 64
  return config
