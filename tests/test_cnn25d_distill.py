"""The 2.5D CNN + bidirectional GRU, the im2col 3D convolution, the per-vertebra distillation
token, and a distillation train step whose CNN teacher is restored from a real (tiny) checkpoint.
Tiny shapes throughout."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cnn25d_lstm
from configs import cnn_vertebra
from configs import vertebra_distill
from cspine_jax import checkpoint
from cspine_jax import losses
from cspine_jax import parallel
from cspine_jax import train_lib
from cspine_jax import train_loop
from cspine_jax.models import factory
from cspine_jax.models import cnn25d
from cspine_jax.models import cnn3d
from cspine_jax.models import heads

# Jitted: eager nnx runs op by op, several times slower on CPU for the same values.
_outputs = nnx.jit(lambda model, x: model.outputs(x))

SHAPE = (6, 8, 8)  # z, y, x of each vertebra crop


def _tiny_cnn25d(**kw):
  return cnn25d.CNN25D(input_shape=SHAPE, widths=(4, 8), blocks=(1, 1), rnn_hidden=4,
                       rngs=nnx.Rngs(0), **kw)


def test_slice_stacks_neighbours_and_edges():
  x = jnp.arange(4, dtype=jnp.float32).reshape(1, 4, 1, 1, 1)
  s = cnn25d.slice_stacks(x, 1)[0, :, 0, 0]
  np.testing.assert_array_equal(s, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])


def test_cnn25d_shapes_and_gradients():
  model = _tiny_cnn25d()
  x = jax.random.normal(jax.random.key(0), (3,) + SHAPE + (1,))
  out = _outputs(model, x)
  assert out['features'].shape == (3, model.width) and out['logits'].shape == (3, 8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    out = m.outputs(x)
    # + features: the zero-initialised head alone would block every gradient below it
    return out['logits'].sum() + (out['features'] ** 2).sum()

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'


def test_bidirectional_gru_sees_both_ends():
  """Slice 0's output depends on the last slice (through the backward GRU only)."""
  model = _tiny_cnn25d()
  x = jax.random.normal(jax.random.key(1), (1,) + SHAPE + (1,))
  h = model.forward_rnn.hidden

  def first_slice(last):
    return model.sequence(x.at[:, -1].set(last))[0, 0]

  jac = jax.jit(jax.jacobian(first_slice))(x[:, -1])  # (2H, 1, y, x, 1)
  per_unit = np.abs(np.asarray(jac)).reshape(2 * h, -1).sum(-1)
  assert (per_unit[:h] == 0).all()  # forward direction: slice 0 has not seen the last one yet
  assert (per_unit[h:] > 0).all()   # backward direction: it has


def test_cnn25d_in_the_vertebra_wrapper_via_config():
  config = cnn25d_lstm.get_config()
  config.model.update(input_shape=SHAPE, widths=(4, 8), blocks=(1, 1), rnn_hidden=4)
  model = factory.build_model(config, 0)
  assert isinstance(model.backbone, cnn25d.CNN25D)
  out = _outputs(model, jnp.zeros((2, 7) + SHAPE + (1,)))
  assert out['logits'].shape == (2, 8)


def test_im2col_conv_equals_xla_conv():
  kw = dict(input_shape=(7, 9, 10), widths=(4, 8, 8), stem_stride=2)
  a = cnn3d.CNN3D(**kw, rngs=nnx.Rngs(0))
  b = cnn3d.CNN3D(conv_impl='im2col', **kw, rngs=nnx.Rngs(0))  # same parameters
  x = jax.random.normal(jax.random.key(2), (2, 7, 9, 10, 1))  # odd sizes: SAME's high-end pad
  np.testing.assert_allclose(_outputs(a, x)['features'], _outputs(b, x)['features'], atol=1e-4)


def _student_config():
  config = vertebra_distill.get_config()
  # DeiT's DIST token, no feature term: the tests below switch them as they need.
  config.model.update(input_shape=SHAPE, patch_size=(2, 4, 4), width=16, depth=1, num_heads=2,
                      mlp_dim=16, distill_token=True, hint_dim=0)
  config.distill.feature_weight = 0.0
  config.batch_size = 2
  return config


def test_the_shipped_student_fits_the_shipped_teacher():
  student, teacher = vertebra_distill.get_config(), cnn_vertebra.get_config()
  assert student.model.hint_dim == teacher.model.widths[-1]
  # The crop shape of a per-vertebra config is data.vertebra_shape (factory.TASKS).
  assert tuple(student.data.vertebra_shape) == tuple(teacher.data.vertebra_shape)
  # The student's 4x6x6 tokens pool onto the teacher's last 2x3x3 map (stem and two strides 2).
  grid = [n // p for n, p in zip(student.data.vertebra_shape, student.model.patch_size)]
  t_grid = [n // (teacher.model.stem_stride * 4) for n in teacher.data.vertebra_shape]
  assert all(g % t == 0 for g, t in zip(grid, t_grid)), (grid, t_grid)


def test_vertebra_distill_token_outputs():
  config = _student_config()
  model = factory.build_model(config, 0)
  x = jax.random.normal(jax.random.key(3), (2, 7) + SHAPE + (1,))
  out = _outputs(model, x)
  for k in ('logits', 'logits_cls', 'logits_dist'):
    assert out[k].shape == (2, 8), k
    np.testing.assert_allclose(out[k][:, 0], heads.noisy_or_logit(out[k][:, 1:]), rtol=1e-5)
  np.testing.assert_allclose(out['logits'], 0.5 * (out['logits_cls'] + out['logits_dist']),
                             rtol=1e-6)
  # The two tokens read different features once the heads move off their zero init.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(6), p.shape),
                        params)
  out = _outputs(nnx.merge(graphdef, params, rest), x)
  assert np.abs(out['logits_cls'] - out['logits_dist']).max() > 1e-4


def _write_teacher(workdir):
  """A tiny per-vertebra CNN saved like a training run: config.json + an Orbax checkpoint."""
  config = cnn_vertebra.get_config()
  config.model.update(input_shape=SHAPE, widths=(4, 8), blocks=(1, 1))
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  model = factory.build_model(config, 0)
  graphdef, state = train_lib.init_state(config, model)
  # Move the zero-initialised heads so the teacher's logits depend on the image.
  state = state.replace(params=jax.tree.map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(4), p.shape), state.params))
  mngr = checkpoint.manager(workdir, config)
  checkpoint.save(mngr, 5, state)
  mngr.wait_until_finished()
  mngr.close()
  return graphdef, state


def test_distillation_step_with_a_restored_cnn_teacher(tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  t_graphdef, t_state = _write_teacher(teacher_dir)
  config = _student_config()
  config.distill.teacher_workdir = teacher_dir
  config.distill.kind = 'soft'
  config.distill.temperature = 2.0
  mesh = parallel.make_mesh()
  teacher, teacher_weights = train_loop._make_teacher(config, mesh)  # pylint: disable=protected-access
  images = jax.random.normal(jax.random.key(5), (2, 7) + SHAPE + (1,))
  # The restored teacher is the saved one.
  want = nnx.merge(t_graphdef, t_state.params, t_state.rest)(images)
  np.testing.assert_allclose(teacher(teacher_weights, images)['logits'], want, atol=1e-5)

  config.optimizer.warmup_steps = 0  # a non-zero learning rate at step 0
  model = factory.build_model(config, 0)
  graphdef, state = train_lib.init_state(config, model)
  step = jax.jit(train_lib.make_train_step(config, graphdef, teacher))
  batch = {'image': images, 'labels': jnp.array([[1, 0, 1, 0, 0, 0, 0, 0]] * 2, jnp.float32),
           'mask': jnp.ones((2,), jnp.float32)}
  new_state, m = step(state, batch, teacher_weights)
  assert np.isfinite(float(m['loss'])) and float(m['grad_norm']) > 0
  np.testing.assert_allclose(m['loss'], 0.5 * m['loss_task'] + 0.5 * m['loss_distill'],
                             rtol=1e-5)
  # Both vertebra heads learn: the DIST head from the teacher, the CLS head from the labels.
  for name in ('vertebra_head', 'vertebra_head_dist'):
    before = getattr(nnx.merge(graphdef, state.params, state.rest), name).kernel[...]
    after = getattr(nnx.merge(graphdef, new_state.params, new_state.rest), name).kernel[...]
    assert np.abs(after - before).max() > 0, name
  with open(os.path.join(teacher_dir, 'config.json')) as f:
    assert json.load(f)['model']['name'] == 'cnn3d'


def test_feature_distillation_step_teaches_the_tokens_the_teachers_last_map(tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  t_graphdef, t_state = _write_teacher(teacher_dir)  # last map: 2x2x2 voxels x 8 channels
  config = _student_config()
  config.model.update(patch_size=(3, 4, 4), distill_token=False, hint_dim=8)  # 2x2x2 tokens
  config.distill.update(teacher_workdir=teacher_dir, kind='soft', feature_weight=2.0)
  config.optimizer.warmup_steps = 0
  teacher, teacher_weights = train_loop._make_teacher(config, parallel.make_mesh())  # pylint: disable=protected-access
  images = jax.random.normal(jax.random.key(7), (2, 7) + SHAPE + (1,))
  t_out = teacher(teacher_weights, images)
  want = nnx.merge(t_graphdef, t_state.params, t_state.rest).outputs(images)['feature_map']
  assert t_out['feature_map'].shape == (2, 7, 2, 2, 2, 8)
  np.testing.assert_allclose(t_out['feature_map'], want, atol=1e-5)

  model = factory.build_model(config, 0)
  graphdef, state = train_lib.init_state(config, model)
  batch = {'image': images, 'labels': jnp.array([[1, 0, 1, 0, 0, 0, 0, 0]] * 2, jnp.float32),
           'mask': jnp.ones((2,), jnp.float32),
           'vertebra_mask': jnp.ones((2, 7), bool).at[1, 6].set(False)}
  out = model.outputs(images)
  feature = losses.feature_distillation_loss(out['hint'], t_out['feature_map'],
                                             batch['vertebra_mask'])
  step = jax.jit(train_lib.make_train_step(config, graphdef, teacher))
  new_state, m = step(state, batch, teacher_weights)
  np.testing.assert_allclose(m['loss_feature'], feature, rtol=1e-5)
  np.testing.assert_allclose(
      m['loss'], 0.5 * m['loss_task'] + 0.5 * m['loss_distill'] + 2.0 * m['loss_feature'],
      rtol=1e-5)
  kernel = lambda s: nnx.merge(graphdef, s.params, s.rest).backbone.hint.kernel[...]  # noqa: E731
  assert np.abs(kernel(new_state) - kernel(state)).max() > 0
  # Twenty steps on the same batch: the tokens move towards the teacher's map.
  for _ in range(20):
    new_state, m = step(new_state, batch, teacher_weights)
  assert float(m['loss_feature']) < 0.7 * float(feature)


def test_feature_distillation_without_a_hint_says_which_key():
  config = _student_config()
  config.distill.update(teacher_workdir='unused', feature_weight=1.0)  # hint_dim 0
  model = factory.build_model(config, 0)
  graphdef, state = train_lib.init_state(config, model)
  teacher = lambda tp, x: {'logits': jnp.zeros((x.shape[0], 8))}  # noqa: E731
  batch = {'image': jnp.zeros((2, 7) + SHAPE + (1,)), 'labels': jnp.zeros((2, 8)),
           'mask': jnp.ones((2,))}
  with pytest.raises(ValueError, match='hint_dim'):
    train_lib.make_train_step(config, graphdef, teacher)(state, batch, None)


def test_feature_distillation_checks_the_teachers_width_first(tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  _write_teacher(teacher_dir)  # widths (4, 8)
  config = _student_config()
  config.model.hint_dim = 4
  config.distill.update(teacher_workdir=teacher_dir, feature_weight=1.0)
  with pytest.raises(train_loop.ConfigError, match=r'hint_dim=4.*widths \[4, 8\]'):
    train_loop._make_teacher(config, parallel.make_mesh())  # pylint: disable=protected-access
