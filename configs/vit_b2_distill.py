"""B2 with a DeiT distillation token, taught by a trained model of this repo.

  python -m cspine_jax.train --config=configs/vit_b2_distill.py \
      --workdir=/tmp/vit_b2_distill --config.data.root=/data/rsna_converted \
      --config.distill.teacher_workdir=/tmp/vit_b2

The teacher is any checkpoint of this repo (its workdir holds its config);
it runs in inference mode and its 8 logits are the distillation targets.
Loss (cspine_jax/losses.py, `distillation_loss`):
(1 - alpha) * BCE(cls head, labels) + alpha * BCE(dist head, teacher), with
hard targets (teacher's sigmoid > 0.5, DeiT's best setting, alpha 0.5) or
soft ones (sigmoid(teacher / T), T^2-scaled). At inference the two heads'
logits are averaged. Expected: val BCE at or below the teacher's when the
teacher is a stronger model (e.g. a CNN) and about equal when it is B2
itself; runtime as B2 plus one teacher forward per step.
"""

from ml_collections import config_dict

from configs import vit_b2


def get_config():
  config = vit_b2.get_config()
  config.model.distill_token = True
  config.distill = config_dict.ConfigDict()
  config.distill.teacher_workdir = ''  # required: set on the command line
  config.distill.alpha = 0.5
  config.distill.kind = 'hard'  # 'hard' | 'soft'
  config.distill.temperature = 1.0  # soft targets only
  return config
