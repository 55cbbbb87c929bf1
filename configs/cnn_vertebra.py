r"""Per-vertebra 3D CNN (ResNet-style, GroupNorm): the convolutional baseline and a teacher.

  python -m cspine_jax.train --config=configs/cnn_vertebra.py --workdir=runs/cnn_vertebra \
      --config.data.root=/data/cspine

Seven 16x24x24 crops at 2 mm per study (one per vertebra, from the masks), a 3D ResNet of widths
16-32-64 shared by the seven, vertebra logits combined by noisy-OR, label smoothing 0.1. On the
demo data (two-stage boxes, 24 held-out studies) it reaches RSNA 0.216 (mean AUC 0.97) in 3 CPU
minutes (0.189 at 800 steps: configs/demo.py); without the label smoothing it ranked as well but
was over-confident (0.82 at mean AUC 0.95 on the 14 held-out studies with masks): README "Model
comparison".
"""
import ml_collections

from configs import common


def get_config():
  config = common.per_vertebra(common.get_config())
  config.model = ml_collections.ConfigDict({
      'name': 'cnn3d', 'mode': 'vertebra', 'input_shape': config.data.get_ref('vertebra_shape'),
      'in_channels': 1, 'widths': (16, 32, 64), 'blocks': (1, 1, 1),
      # Stride-2 stem: XLA's CPU 3D convolutions are slow; 8x fewer voxels after the stem.
      'stem_stride': 2, 'norm': 'group', 'dropout': 0.0, 'patient_head': 'noisy_or',
      # Convolutions as shifted views + one matmul: ~1.6x faster steps on CPU (cnn3d.py).
      'conv_impl': 'im2col', 'dtype': 'float32'})
  # The teacher of configs/vertebra_distill.py: calibrated targets matter there too.
  config.label_smoothing = 0.1
  return config
