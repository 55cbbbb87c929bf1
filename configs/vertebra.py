r"""Per-vertebra ViT: one crop per vertebra through a small 3D ViT (stage 2 of the two-stage flow).

  python -m cspine_jax.train --config=configs/vertebra.py --workdir=W --config.data.root=CONVERTED

Seven 16x24x24 crops per study (each vertebra's box from the true mask, else the localizer's
predicted box, plus 3 mm, stretched onto the crop), a 3D ViT with 4x4x4-voxel patches (a 4x6x6
token grid, width 96, depth 4, mean pool) shared by the seven, a per-vertebra logit, vertebra
logits combined by noisy-OR into patient_overall, plain BCE, 800 steps of batch 8 (~5.5 minutes
on 2 CPU cores, 17.6 samples/s). Trained on every labelled study with true or predicted boxes.
On the demo data (two-stage boxes, 24 held-out studies, constant 0.546): RSNA 0.257, mean AUC
0.96; at 400 steps it was 0.343 (mean AUC 0.92: still underfitting the training set, loss ~0.3),
so the longer schedule is this ViT's small-data recipe (not longer still: 0.380 at 1600 steps,
overfitting; nor stronger augmentation alone: 0.412; both together, 3200 steps of strong
augmentation, scored 0.179 on one seed, ~24 minutes: not the default until replicated).
Behind the 3D CNN of configs/cnn_vertebra.py (0.189 at 800 steps, configs/demo.py's classifier),
and behind this ViT taught by that CNN for 3200 steps (configs/vertebra_distill.py: 0.158, ahead
of its teacher, at the cost of the teacher's run plus ~37 minutes): README "Model comparison".
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
  # Twice the CNNs' schedule: at 400 steps this ViT had not fitted the training set yet.
  config.total_steps = 800
  return config
