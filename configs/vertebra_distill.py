r"""The per-vertebra ViT with a DeiT distillation token, taught by a CNN of this repo.

  python -m cspine_jax.train --config=configs/cnn_vertebra.py --workdir=runs/cnn \
      --config.data.root=/data/cspine                                   # the teacher first
  python -m cspine_jax.train --config=configs/vertebra_distill.py --workdir=runs/distill \
      --config.data.root=/data/cspine --config.distill.teacher_workdir=runs/cnn \
      [--config.distill.kind=soft --config.distill.temperature=2]

Student: configs/vertebra.py's ViT (4 mm patches, width 96, depth 4) with a DIST token beside CLS;
VertebraClassifier gives each token its own vertebra head, so the loss sees 'logits_cls'
(against the labels) and 'logits_dist' (against the teacher); prediction averages the two.
Teacher: any workdir of this repo taking the same input (its config.json and checkpoint
`distill.teacher_checkpoint`: 'latest', 'best' or a step), frozen, run in the same jitted step.
Loss (cspine_jax/losses.py): (1 - alpha) * BCE(cls, labels) + alpha * BCE(dist, teacher targets),
hard (teacher's p > 0.5) or soft (sigmoid(teacher / T), T^2-scaled). Numbers on the demo data:
README "Model comparison".
"""
from ml_collections import config_dict

from configs import vertebra


def get_config():
  config = vertebra.get_config()
  config.model.distill_token = True
  config.distill = config_dict.ConfigDict()
  config.distill.teacher_workdir = ''  # required: set on the command line
  config.distill.teacher_checkpoint = 'latest'
  config.distill.alpha = 0.5
  config.distill.kind = 'hard'  # 'hard' | 'soft'
  config.distill.temperature = 1.0  # soft targets only
  # Feature distillation (losses.feature_distillation_loss): weight of the hint term, 0 = off.
  config.distill.feature_weight = 0.0
  return config
