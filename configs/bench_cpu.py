"""The fixed CPU benchmark shape: 1 x 96 x 128 x 128 input, 16^3 patches.

  python -m cspine_jax.train --config=configs/bench_cpu.py --workdir=/tmp/bench

Model input (2, 96, 128, 128, 1) float32 -> 6 x 8 x 8 = 384 patch tokens +
CLS; ViT width 384, depth 6, 6 heads, MLP 1536 (ViT-S width, half depth),
batch 2, AdamW, float32. 12,224,264 parameters. One train step is 63.2
GFLOP by XLA's count (62.1 GFLOP of matmuls by the closed form;
cspine_jax/benchmarks/flops.py), so ~1.1 s on the 2-core CI machine at ~50% of its
~110 GFLOP/s f32 matmul peak. Short: 20 steps, for step time
and MFU, not for accuracy.
"""

from configs import common


def get_config():
  config = common.get_config()
  config.data.input_shape = (96, 128, 128)
  config.data.windows = (common.BONE_WINDOW,)
  config.batch_size = 2
  config.total_steps = 20
  config.log_every_steps = 5
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 20
  config.optimizer.warmup_steps = 5

  m = config.model
  m.in_channels = 1
  m.patch_size = (16, 16, 16)
  m.width = 384
  m.depth = 6
  m.num_heads = 6
  m.mlp_dim = 1536
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  return config
