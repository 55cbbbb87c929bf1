r"""Per-vertebra 3D CNN (ResNet-style, GroupNorm): the convolutional baseline and a teacher.

  python -m cspine_jax.train --config=configs/cnn_vertebra.py --workdir=runs/cnn_vertebra \
      --config.data.root=/data/cspine

Seven 16x24x24 crops at 2 mm per study (one per vertebra, from the masks), a 3D ResNet of widths
16-32-64 shared by the seven, vertebra logits combined by noisy-OR. On the synthetic demo data it
learns the fracture lines in a few CPU minutes (see README "Measured").
"""
import ml_collections

from configs import common


def get_config():
  config = common.per_vertebra(common.get_config())
  config.model = ml_collections.ConfigDict({
      'name': 'cnn3d', 'mode': 'vertebra', 'input_shape': config.data.input_shape,
      'in_channels': 1, 'widths': (16, 32, 64), 'blocks': (1, 1, 1),
      # Stride-2 stem: XLA's CPU 3D convolutions are slow; 8x fewer voxels after the stem.
      'stem_stride': 2, 'norm': 'group', 'dropout': 0.0, 'patient_head': 'noisy_or',
      # Convolutions as shifted views + one matmul: ~1.6x faster steps on CPU (cnn3d.py).
      'conv_impl': 'im2col', 'dtype': 'float32'})
  return config
