"""Restoring for inference: the model item alone (no optimizer), workdirs of the earlier one-item
checkpoint layout, the task table's config checks, and the import arrows the layout promises."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cspine_jax import checkpoint
from cspine_jax import parallel
from cspine_jax import restore
from cspine_jax import train_lib
from cspine_jax import train_loop
from cspine_jax.models import factory
from tests.conftest import repo_root


def _full_state(workdir, step=None):
  """The whole TrainState of a workdir's checkpoint (as training restores it)."""
  config = restore.load_config(workdir)
  replicated = parallel.replicated(parallel.make_mesh())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        jax.eval_shape(train_lib.init_fn(config)))
  mngr = checkpoint.manager(workdir, config, read_only=True)
  step = step or mngr.latest_step()
  state = checkpoint.restore(mngr, step, target)
  mngr.close()
  return config, step, state


def write_legacy_copy(src: str, dst: str) -> None:
  """``src`` rewritten in the layout of workdirs before the model/train split: config.json and
  one `state` item holding the whole TrainState per checkpoint (what the earlier
  `checkpoint.save` wrote, `ocp.args.Composite(state=StandardSave(state))`)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns('checkpoints'))
  config, step, state = _full_state(src)
  mngr = ocp.CheckpointManager(os.path.join(os.path.abspath(dst), 'checkpoints'))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  mngr.close()


def _trained(smoke_config, tmp_path_factory, name='w'):
  workdir = str(tmp_path_factory.mktemp('restore') / name)
  smoke_config.total_steps = 3
  smoke_config.eval_every_steps = 0
  smoke_config.ema_decay = 0.5  # the inference weights are then the EMA, not the parameters
  train_loop.train_and_evaluate(smoke_config, workdir, progress=False)
  return workdir


def test_inference_restore_reads_the_model_item_and_never_builds_an_optimizer(
    smoke_config, tmp_path_factory, monkeypatch):
  workdir = _trained(smoke_config, tmp_path_factory)
  config, step, state = _full_state(workdir)
  assert sorted(ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')).item_metadata(
      step).keys()) == ['data', 'model', 'train']

  def no_optimizer(*_):
    raise AssertionError('inference restore built an optimizer')

  monkeypatch.setattr(train_lib, 'make_optimizer', no_optimizer)
  model = restore.InferenceModel(workdir)
  assert model.step == step == 3 and model.task.mode == 'region'
  for got, want in zip(jax.tree.leaves(model.weights['params']), jax.tree.leaves(state.ema)):
    np.testing.assert_array_equal(got, want)  # EMA weights, exactly as saved
  images = np.random.default_rng(0).random((2, 16, 32, 32, 1), np.float32)
  want = restore.make_apply(model.graphdef, 'probs')({'params': state.ema, 'rest': state.rest},
                                                     images)
  np.testing.assert_allclose(model.predict(images), want, rtol=1e-5)
  with pytest.raises(ValueError, match='is a classifier, not a localizer'):
    restore.InferenceModel(workdir, expect='localizer')


def test_a_workdir_of_the_old_layout_restores_for_inference_and_training(
    smoke_config, tmp_path_factory):
  workdir = _trained(smoke_config, tmp_path_factory, 'new')
  old = str(tmp_path_factory.mktemp('restore') / 'old')
  write_legacy_copy(workdir, old)
  assert os.listdir(os.path.join(old, 'checkpoints', '3')).count('state') == 1
  new_model, old_model = restore.InferenceModel(workdir), restore.InferenceModel(old)
  assert old_model.step == 3
  for a, b in zip(jax.tree.leaves(new_model.weights), jax.tree.leaves(old_model.weights)):
    np.testing.assert_array_equal(a, b)
  # Training's restore (resume) reads the old item whole: the same TrainState.
  _, _, new_state = _full_state(workdir)
  _, _, old_state = _full_state(old)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(old_state)):
    np.testing.assert_array_equal(a, b)


def test_best_step_reads_saved_metrics_through_orbax(tmp_path):
  mngr = checkpoint.manager(str(tmp_path))
  state = {'x': np.zeros(3, np.float32)}
  for step, score in ((1, 0.5), (2, 0.3), (3, 0.4)):
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(state)),
              metrics={checkpoint.BEST_METRIC: score}, force=True)
  mngr.wait_until_finished()
  mngr.close()
  assert checkpoint.best_step(checkpoint.manager(str(tmp_path), read_only=True)) == 2


@pytest.mark.parametrize('change,keys', [
    (lambda c: setattr(c.data, 'crop_mode', 'region'), ('config.model.mode', 'config.data.crop_mode')),
    (lambda c: (c.model.__delitem__('input_shape'), setattr(c.model, 'input_shape', (8, 8, 8))),
     ('config.model.input_shape', 'config.data.vertebra_shape')),
    (lambda c: setattr(c, 'loss', 'ce_dice'), ('config.loss',)),
    (lambda c: setattr(c.model, 'name', 'resnet'), ('config.model.name',)),
])
def test_task_table_rejects_mismatched_keys_naming_them(change, keys):
  from configs import cnn_vertebra
  config = cnn_vertebra.get_config()
  config.data.root = '/nonexistent'
  change(config)
  with pytest.raises(factory.ConfigError) as e:
    train_loop.validate_config(config)
  for key in keys:
    assert key in str(e.value)


def test_every_task_names_a_crop_mode_and_shape_key_the_pipeline_has():
  from cspine_jax.data import config as data_config
  from cspine_jax.data import transforms
  defaults = data_config.get_config()
  for task in factory.TASKS.values():
    assert task.crop_mode in transforms.CROP_MODES
    assert task.shape_key in defaults
    assert set(task.backbones) <= set(factory.MODELS)


def test_the_crop_shape_is_one_key_per_task():
  from configs import cnn25d_lstm
  from configs import localizer
  from configs import vertebra
  for module in (cnn25d_lstm, vertebra):
    config = module.get_config()
    config.data.vertebra_shape = (8, 12, 12)  # reaches the model through the reference
    assert factory.crop_shape(config) == tuple(config.model.input_shape) == (8, 12, 12)
    assert 'input_shape' not in config.data  # the other mode's key fails instead of doing nothing
  config = localizer.get_config()
  config.data.input_shape = (32, 32, 32)
  assert factory.crop_shape(config) == tuple(config.model.input_shape) == (32, 32, 32)
  assert 'vertebra_shape' not in config.data
  proc = subprocess.run(
      [sys.executable, '-m', 'cspine_jax.train', '--config=configs/cnn_vertebra.py',
       '--workdir=/nonexistent/w', '--config.data.input_shape=(8,8,8)'],
      capture_output=True, text=True, cwd=repo_root(), timeout=120,
      env=dict(os.environ, PYTHONPATH=repo_root()))
  assert proc.returncode != 0 and 'input_shape' in proc.stderr


def _loaded_after(imports: str, prefixes: tuple[str, ...]) -> list[str]:
  """The modules starting with ``prefixes`` that a fresh interpreter holds after ``imports``."""
  code = f'import sys\nimport {imports}\nprint(sorted(m for m in sys.modules if m.startswith({prefixes!r})))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=repo_root(), env=dict(os.environ, PYTHONPATH=repo_root()), timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return eval(out.stdout.strip())  # pylint: disable=eval-used  (a printed list of str)


def test_inference_entry_points_never_import_the_training_side():
  training = ('cspine_jax.train_loop', 'cspine_jax.train_lib', 'cspine_jax.train')
  assert _loaded_after('cspine_jax.eval, cspine_jax.predict, cspine_jax.predict_lib, '
                       'cspine_jax.localize', training) == []
  # The offline tools load neither JAX nor the models' side.
  assert _loaded_after('data_tools.convert, data_tools.synthetic, data_tools.localize',
                       ('cspine_jax.models', 'cspine_jax.train', 'cspine_jax.restore', 'jax',
                        'flax')) == []


def test_data_tools_localize_is_the_same_command():
  env = dict(os.environ, PYTHONPATH=repo_root())
  for module in ('data_tools.localize', 'cspine_jax.localize'):
    proc = subprocess.run([sys.executable, '-m', module, '--workdir=/nonexistent/w',
                           '--data=/nonexistent/d'], capture_output=True, text=True,
                          cwd=repo_root(), env=env, timeout=120)
    # A usage error (exit 2), one line: it used to be a traceback from the manifest reader.
    assert proc.returncode == 2 and 'no manifest.jsonl' in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().count('\n') == 0 and 'Traceback' not in proc.stderr
