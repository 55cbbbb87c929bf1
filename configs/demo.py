r"""Demo: a model that learns the synthetic fractures in a few CPU minutes (README main command).

  python -m cspine_jax.demo --workdir=demo_out          # generates, converts, trains, evaluates
  python -m cspine_jax.train --config=configs/demo.py --workdir=W --config.data.root=CONVERTED

Per-vertebra mode: seven 16x24x24 crops at 2 mm (one per vertebra, from the true masks, else the
localizer's predicted boxes) through a small 3D ViT with 4 mm patches, vertebra logits combined by
noisy-OR into patient_overall. Trained on every labelled study with true or predicted boxes (the
demo runs configs/localizer.py and data_tools.localize first). Expect the held-out RSNA score
well below the constant-prevalence baseline (numbers in the README).
"""
from configs import common


def get_config():
  config = common.per_vertebra(common.get_config())
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
