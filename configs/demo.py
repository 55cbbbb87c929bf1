r"""The demo's classifier (stage 2 of `python -m cspine_jax.demo`): the best per-vertebra model.

  python -m cspine_jax.demo --workdir=demo_out          # generates, converts, trains, evaluates
  python -m cspine_jax.train --config=configs/demo.py --workdir=W --config.data.root=CONVERTED

Whichever per-vertebra model scored best on the held-out synthetic studies through the two-stage
flow (README "Model comparison", 24 held-out studies, constant 0.546): now the 3D ResNet of
configs/cnn_vertebra.py (label smoothing 0.1) trained for 800 steps of batch 8 (~5 minutes on 2
CPU cores): RSNA 0.189, mean AUC 0.99; at its config's 400 steps 0.216; the 2.5D CNN + GRU 0.244
and the per-vertebra ViT of configs/vertebra.py behind (those with the previous 48^3 localizer's
boxes). In the demo, with configs/localizer.py's 64^3 boxes (held-out Dice 0.91): RSNA 0.139,
mean AUC 1.00, against 0.567 for the constant training prevalence.
"""
from configs import cnn_vertebra


def get_config():
  config = cnn_vertebra.get_config()
  config.total_steps = 800
  return config
