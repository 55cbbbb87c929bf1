r"""Per-vertebra 2.5D CNN + bidirectional GRU (the RSNA 2022 1st/2nd-place recipe, small).

  python -m cspine_jax.train --config=configs/cnn25d_lstm.py --workdir=runs/cnn25d \
      --config.data.root=/data/cspine

Seven 16x24x24 crops at 2 mm per study (one per vertebra), as configs/vertebra.py. In each crop every
axial slice is stacked with its two neighbours (3 channels) and goes through a 2D ResNet of widths
16-32-64 shared by all slices; a bidirectional GRU (64 per direction) runs over the 16 slices,
mean and max over slices give the vertebra's features; vertebra logits combined by noisy-OR.
(The key is `cnn25d_lstm` after the competition write-ups; the cell is a GRU, which those used
interchangeably with an LSTM and which has a quarter fewer recurrent weights.) Numbers on the
demo data: README "Model comparison".
"""
import ml_collections

from configs import common


def get_config():
  config = common.per_vertebra(common.get_config())
  config.model = ml_collections.ConfigDict({
      'name': 'cnn25d_lstm', 'mode': 'vertebra', 'input_shape': config.data.get_ref('vertebra_shape'),
      'in_channels': 1, 'context': 1, 'widths': (16, 32, 64), 'blocks': (1, 1, 1),
      # Stride-2 stem: 24x24 slices -> 12x12 at the first block; 4x fewer pixels on CPU.
      'stem_stride': 2, 'rnn_hidden': 64, 'dropout': 0.0, 'patient_head': 'noisy_or',
      'dtype': 'float32'})
  return config
