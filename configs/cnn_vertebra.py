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
  config = common.get_config()
  d = config.data
  d.crop_mode = 'vertebrae'
  d.vertebra_shape = (16, 24, 24)
  d.vertebra_spacing_mm = (2.0, 2.0, 2.0)
  d.input_shape = (16, 24, 24)
  d.require_segmentation = True
  d.fold = -1
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
  config.model = ml_collections.ConfigDict({
      'name': 'cnn3d', 'mode': 'vertebra', 'input_shape': d.input_shape, 'in_channels': 1,
      'widths': (16, 32, 64), 'blocks': (1, 1, 1), 'norm': 'group', 'dropout': 0.0,
      'patient_head': 'noisy_or', 'dtype': 'float32'})
  return config
