"""The 3D CNN and the per-vertebra wrapper: shapes, shared weights, the patient combination, and
BatchNorm statistics carried through the jitted train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cnn_vertebra
from cspine_jax import constants
from cspine_jax import restore
from cspine_jax import train_lib
from cspine_jax.models import factory
from cspine_jax.models import heads

# Jitted: eager nnx runs op by op, several times slower on CPU for the same values.
_outputs = nnx.jit(lambda model, x: model.outputs(x))


def _config(name='cnn3d', mode='vertebra', norm='group', patient_head='noisy_or'):
  config = cnn_vertebra.get_config()
  config.model.mode = mode
  config.model.norm = norm
  config.model.patient_head = patient_head
  config.model.widths = (4, 8)
  config.model.blocks = (1, 1)
  config.model.input_shape = (8, 8, 8)
  config.batch_size = 2
  return config


def test_vertebra_mode_shapes_and_patient_noisy_or():
  model = factory.build_model(_config(), 0)
  x = jax.random.normal(jax.random.key(0), (3, 7, 8, 8, 8, 1))
  out = _outputs(model, x)
  assert out['logits'].shape == (3, 8) and out['features'].shape == (3, 7, 8)
  np.testing.assert_allclose(out['logits'][:, 0], heads.noisy_or_logit(out['logits'][:, 1:]),
                             rtol=1e-5)
  # Zero-initialised head: every vertebra starts at its training prevalence.
  p = jax.nn.sigmoid(out['logits'][:, 1:])
  np.testing.assert_allclose(p[0], constants.POSITIVE_RATES[1:], rtol=1e-4)


def test_vertebra_crops_share_the_backbone():
  """Swapping two vertebrae's crops swaps their features (up to the level embedding)."""
  model = factory.build_model(_config(patient_head='logit'), 0)
  x = jax.random.normal(jax.random.key(1), (1, 7, 8, 8, 8, 1))
  f = _outputs(model, x)['features'] - model.level_embed[...][None]
  swapped = x.at[:, [2, 5]].set(x[:, [5, 2]])
  g = _outputs(model, swapped)['features'] - model.level_embed[...][None]
  np.testing.assert_allclose(f[0, 2], g[0, 5], atol=1e-5)
  np.testing.assert_allclose(f[0, 0], g[0, 0], atol=1e-5)


def test_region_mode_cnn():
  model = factory.build_model(_config(mode='region', patient_head='logit'), 0)
  assert nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 8, 8, 8, 1))).shape == (2, 8)


def test_batchnorm_statistics_update_in_the_train_step():
  config = _config(norm='batch')
  model = factory.build_model(config, 0)
  graphdef, state = train_lib.init_state(config, model)
  step = jax.jit(train_lib.make_train_step(config, graphdef))
  batch = {'image': 3.0 + jax.random.normal(jax.random.key(2), (2, 7, 8, 8, 8, 1)),
           'labels': jnp.zeros((2, 8)), 'mask': jnp.ones((2,), bool)}
  before = jax.tree.leaves(state.rest)
  new, m = step(state, batch)
  after = jax.tree.leaves(new.rest)
  assert before and any(not np.allclose(a, b) for a, b in zip(before, after))
  assert np.isfinite(float(m['loss']))
  # Eval uses running averages: the prediction is deterministic and batch-independent.
  predict = jax.jit(restore.make_apply(graphdef, 'probs'))
  weights = restore.inference_weights(config, new)
  one = predict(weights, batch['image'][:1])
  two = predict(weights, batch['image'])[:1]
  np.testing.assert_allclose(one, two, rtol=1e-5)


def test_unknown_mode_is_rejected():
  config = _config()
  config.model.mode = 'slices'
  with pytest.raises(ValueError, match="model.mode='slices'"):
    factory.build_model(config, 0)
