"""What a careful user trips on in training and evaluation (issue 17): best checkpoints across a
resume, config keys settable from the command line, gradient accumulation with masks,
distillation without a teacher, empty datasets and splits, damaged workdirs (torn metrics line,
changed config, damaged checkpoints), TensorBoard on resume, one-line errors and quiet logs."""
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import common
from configs import smoke
from configs import vertebra_distill
from cspine_jax import checkpoint
from cspine_jax import cli
from cspine_jax import eval as eval_lib
from cspine_jax import evaluate
from cspine_jax import train_lib
from cspine_jax import train_loop
from cspine_jax.data import store
from cspine_jax.models import factory
from tests.conftest import repo_root

ROOT = repo_root()


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _run(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('CSPINE_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=timeout)


def _train_args(root, workdir, *extra):
  return ('cspine_jax.train', '--config=configs/smoke.py', f'--workdir={workdir}',
          f'--config.data.root={root}', '--noprogress', *extra)


PROJECT_FILES = {os.path.basename(p) for d in ('cspine_jax', 'data_tools')
                 for p in glob.glob(os.path.join(ROOT, d, '**', '*.py'), recursive=True)}


def _project_log_line(line):
  m = re.match(r'[IWE]\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] ', line)
  return bool(m) and m.group(1) in PROJECT_FILES


def _one_error_line(proc):
  """The command's stderr ends with one `error: ...` line: no traceback, nothing from the
  libraries, at most the project's own log lines before it."""
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines and lines[-1].startswith('error: '), proc.stderr[-3000:]
  assert all(_project_log_line(l) for l in lines[:-1]), proc.stderr[-3000:]
  return lines[-1]


# ------------------------------------------------------------------ best checkpoints

# Eval RSNA scores by step: step 3 is the best; steps 7 and 8 (after the resume) are worse.
SCORES = {1: 0.60, 2: 0.50, 3: 0.20, 4: 0.40, 5: 0.30, 6: 0.35, 7: 0.45, 8: 0.55}


def test_best_checkpoint_survives_a_resume_and_eval_best_restores_it(smoke_config, tmp_path,
                                                                     monkeypatch):
  steps = []

  def scored(config, task, fn, mesh, split='eval', uids=None):
    steps.append(len(steps) + 1)  # one evaluation per step
    return {checkpoint.BEST_METRIC: SCORES[steps[-1]]}

  monkeypatch.setattr(evaluate, 'task_metrics', scored)
  c = smoke_config
  c.eval_every_steps = c.checkpoint_every_steps = 1
  c.keep_latest_checkpoints, c.keep_best_checkpoints = 2, 1
  workdir = str(tmp_path / 'w')
  train_loop.train_and_evaluate(c, workdir, progress=False)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [3, 5, 6]
  # Orbax wrote the metrics to disk: a new manager (a restart) ranks them.
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '3', 'metrics'))
  c.total_steps = 8
  train_loop.train_and_evaluate(c, workdir, progress=False)
  assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [3, 7, 8]
  mngr = checkpoint.manager(workdir, read_only=True)
  assert checkpoint.best_step(mngr) == 3
  assert checkpoint.resolve_step(mngr, 'best') == 3
  monkeypatch.undo()
  summary = eval_lib.run(workdir, c.data.root, 'best', str(tmp_path / 'sub.csv'))
  assert summary['checkpoint_step'] == 3


# ------------------------------------------------------------------ config keys


def _keys_read_by_the_code():
  """Every config key that the package reads with .get('key'): they must have defaults."""
  pattern = re.compile(r"\bconfig\.(?:(data|optimizer|distill)\.)?get\('(\w+)'")
  keys = set()
  for path in glob.glob(os.path.join(ROOT, 'cspine_jax', '**', '*.py'), recursive=True):
    for block, key in pattern.findall(open(path).read()):
      keys.add(f'{block}.{key}' if block else key)
  return keys


def test_every_key_the_code_reads_has_a_default():
  keys = _keys_read_by_the_code()
  assert {'ema_decay', 'grad_accum_steps', 'param_sharding', 'keep_best_checkpoints',
          'keep_latest_checkpoints'} <= keys, keys
  base = common.get_config()
  distill = vertebra_distill.get_config()
  missing = []
  for key in sorted(keys):
    block, _, name = key.rpartition('.')
    config = distill if block == 'distill' else base
    if key == 'distill':
      config, name, block = distill, 'distill', ''
    holder = config[block] if block else config
    if name not in holder:
      missing.append(key)
  assert not missing, f'read by the code, with no default in the configs: {missing}'


def test_documented_keys_can_be_set_on_the_command_line(synthetic_converted, tmp_path):
  workdir = str(tmp_path / 'keys')
  proc = _run(*_train_args(synthetic_converted[1], workdir, '--config.total_steps=2',
                           '--config.eval_every_steps=0', '--config.checkpoint_every_steps=2',
                           '--config.ema_decay=0.9', '--config.grad_accum_steps=2',
                           '--config.param_sharding=fsdp', '--config.keep_best_checkpoints=1',
                           '--config.keep_latest_checkpoints=3'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert (saved['ema_decay'], saved['grad_accum_steps'], saved['param_sharding'],
          saved['keep_best_checkpoints'], saved['keep_latest_checkpoints']) == (
              0.9, 2, 'fsdp', 1, 3)
  assert [r['step'] for r in _records(workdir)] == [1, 2]


@pytest.mark.parametrize('key,value,message', [
    ('param_sharding', 'zero3', "config.param_sharding='zero3'"),
    ('keep_latest_checkpoints', 0, 'config.keep_latest_checkpoints=0'),
    ('keep_best_checkpoints', -1, 'config.keep_best_checkpoints=-1'),
    ('grad_accum_steps', 3, 'config.grad_accum_steps=3'),
])
def test_bad_values_of_those_keys_name_them(smoke_config, tmp_path, key, value, message):
  smoke_config[key] = value
  with pytest.raises(train_loop.ConfigError, match=re.escape(message)):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)
  assert not os.path.exists(tmp_path / 'w')


# ------------------------------------------------------------------ gradient accumulation


def _masked_batch_and_state(mask):
  config = smoke.get_config()
  config.model.head_zero_init = False  # a zero head would make the loss parameter-free
  config.optimizer.warmup_steps = 0
  rng = np.random.default_rng(0)
  b = len(mask)
  batch = {'image': jnp.asarray(rng.normal(size=(b, 16, 32, 32, 1)), jnp.float32),
           'labels': jnp.asarray(rng.integers(0, 2, (b, 8)), jnp.float32),
           'labelled': jnp.ones((b,), bool), 'mask': jnp.asarray(mask, bool)}
  graphdef = nnx.graphdef(factory.abstract_model(config))
  state = train_lib.init_fn(config)()
  return config, graphdef, state, batch


@pytest.mark.parametrize('mask', [[1, 1, 1, 0], [0, 1, 1, 1]])
def test_gradient_accumulation_with_masked_examples_equals_the_full_batch(mask):
  config, graphdef, state, batch = _masked_batch_and_state(mask)
  full_step = jax.jit(train_lib.make_train_step(config, graphdef))
  full_state, full = full_step(state, batch)
  config.grad_accum_steps = 2
  acc_state, acc = jax.jit(train_lib.make_train_step(config, graphdef))(state, batch)
  # The old code averaged the two micro-batch means: with [1, 1, 1, 0] that weighs the lone
  # example of the second half like the two of the first (1.1442 vs 1.3357 in the issue).
  assert float(acc['loss']) == pytest.approx(float(full['loss']), rel=1e-5)
  assert float(acc['grad_norm']) == pytest.approx(float(full['grad_norm']), rel=1e-4)
  # Adam's first moment after one step is (1 - b1) x the gradient: the gradients agree leaf by
  # leaf (the parameters would not show it: Adam turns float noise in a ~0 gradient into +-lr).
  for a, f in zip(jax.tree.leaves(acc_state.opt_state), jax.tree.leaves(full_state.opt_state)):
    a, f = np.asarray(a, np.float64), np.asarray(f, np.float64)
    np.testing.assert_allclose(a, f, rtol=1e-3, atol=1e-5 * float(np.abs(f).max()) + 1e-30)
  # The masked example really is left out: changing its image changes nothing.
  poisoned = dict(batch, image=batch['image'].at[np.argmin(mask)].set(100.0))
  _, again = full_step(state, poisoned)
  assert float(again['loss']) == pytest.approx(float(full['loss']), rel=1e-5)


# ------------------------------------------------------------------ silent fallbacks


def test_distillation_without_a_teacher_is_a_config_error(synthetic_converted, tmp_path):
  config = vertebra_distill.get_config()
  config.data.root = synthetic_converted[1]
  with pytest.raises(train_loop.ConfigError, match='config.distill.teacher_workdir is empty'):
    train_loop.train_and_evaluate(config, str(tmp_path / 'w'), progress=False)
  config.distill.teacher_workdir = str(tmp_path / 'no_such_run')
  with pytest.raises(train_loop.ConfigError, match='not a training workdir'):
    train_loop.train_and_evaluate(config, str(tmp_path / 'w'), progress=False)
  assert not os.path.exists(tmp_path / 'w')


# ------------------------------------------------------------------ empty and degenerate data


@pytest.fixture
def empty_dataset(tmp_path):
  root = str(tmp_path / 'empty')
  os.makedirs(root)
  store.write_manifest(root, [])
  return root


def test_training_on_an_empty_dataset_fails_at_start(smoke_config, empty_dataset, tmp_path):
  smoke_config.data.root = empty_dataset
  with pytest.raises(train_loop.ConfigError, match='lists no converted study'):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)
  assert not os.path.exists(tmp_path / 'w')


def test_no_training_study_after_the_filters_names_them(smoke_config, tmp_path):
  # Only the unlabelled test study: converted, but nothing to train on.
  root = str(tmp_path / 'only_test')
  os.makedirs(root)
  records = [r for r in store.read_manifest(smoke_config.data.root) if r['split'] == 'test']
  assert len(records) == 1
  store.write_manifest(root, records)
  smoke_config.data.root = root
  with pytest.raises(train_loop.ConfigError, match='no training study: 1 converted, 0 labelled'):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)


def test_a_fold_outside_the_folds_names_the_keys(smoke_config, tmp_path):
  smoke_config.data.fold, smoke_config.data.num_folds = 7, 5
  with pytest.raises(train_loop.ConfigError, match='config.data.fold'):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)


def test_eval_on_an_empty_dataset_or_split_is_a_usage_error(synthetic_converted, empty_dataset,
                                                            tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _run(*_train_args(synthetic_converted[1], workdir, '--config.total_steps=1',
                           '--config.eval_every_steps=0', '--config.checkpoint_every_steps=1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = str(tmp_path / 'sub.csv')
  proc = _run('cspine_jax.eval', f'--workdir={workdir}', f'--data={empty_dataset}',
              f'--output={out}')
  assert proc.returncode == 2
  assert 'no converted study in --split=all' in _one_error_line(proc)
  assert not os.path.exists(out)
  with pytest.raises(cli.UsageError, match="--split='nonsense'"):
    eval_lib.run(workdir, synthetic_converted[1], 'latest', out, split='nonsense')
  proc = _run('cspine_jax.eval', f'--workdir={tmp_path / "nowhere"}',
              f'--data={synthetic_converted[1]}', f'--output={out}')
  assert proc.returncode == 2 and 'not a training workdir' in _one_error_line(proc)


def test_no_held_out_fold_skips_evaluation_with_a_warning(synthetic_converted, tmp_path):
  # fold=-1 with eval_every_steps > 0 used to train, then die at the first evaluation before
  # its checkpoint was written.
  workdir = str(tmp_path / 'w')
  proc = _run(*_train_args(synthetic_converted[1], workdir, '--config.data.fold=-1',
                           '--config.total_steps=2', '--config.eval_every_steps=1',
                           '--config.checkpoint_every_steps=2'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'periodic evaluation skipped' in proc.stderr
  assert [r['step'] for r in _records(workdir)] == [1, 2]
  assert not any(k.startswith('eval_') for r in _records(workdir) for k in r)
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']


# ------------------------------------------------------------------ resume robustness


@pytest.fixture(scope='module')
def base_run(synthetic_converted, tmp_path_factory):
  """A 4-step smoke run with checkpoints {2, 4} (command line, as a user runs it)."""
  workdir = str(tmp_path_factory.mktemp('base') / 'w')
  proc = _run(*_train_args(synthetic_converted[1], workdir, '--config.total_steps=4',
                           '--config.eval_every_steps=0', '--config.checkpoint_every_steps=2'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  return synthetic_converted[1], workdir


def _copy(base_run, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(base_run[1], workdir)
  return base_run[0], workdir


def _tb_events(workdir):
  """(file, event) of every TensorBoard event, in file order (TFRecord framing by hand)."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.*'))):
    data = open(path, 'rb').read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      out.append((path, event))
      i += 12 + n + 4
  return out


def _tensorboard_view(workdir, tag='loss'):
  """Steps of ``tag`` as TensorBoard shows them: a SessionLog START at step s (purge_step)
  discards the events of earlier files at steps >= s."""
  seen = []
  for _, event in _tb_events(workdir):
    if event.HasField('session_log') and event.session_log.status == event.session_log.START:
      seen = [s for s in seen if s < event.step]
    for v in event.summary.value:
      if v.tag == tag:
        seen.append(event.step)
  return seen


def test_a_torn_metrics_line_is_dropped_and_tensorboard_keeps_each_step_once(base_run,
                                                                             tmp_path):
  root, workdir = _copy(base_run, tmp_path)
  reference = {r['step']: r['loss'] for r in _records(workdir)}
  # A kill -9 after step 4's checkpoint, during the append of step 5's line; TensorBoard
  # already holds steps 1-4 of the killed run.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 5, "loss": 0.69')
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # resume from 2: 3-4 are redone
  proc = _run(*_train_args(root, workdir, '--config.total_steps=5', '--config.eval_every_steps=0',
                           '--config.checkpoint_every_steps=2'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'metrics.jsonl:5: not a JSON line' in proc.stderr
  records = _records(workdir)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5]
  for r in records[:4]:
    assert r['loss'] == pytest.approx(reference[r['step']], rel=1e-5)
  assert _tensorboard_view(workdir) == [1, 2, 3, 4, 5]


def test_a_rerun_with_another_config_is_refused_and_changes_nothing(base_run, tmp_path):
  root, workdir = _copy(base_run, tmp_path)
  before = open(os.path.join(workdir, 'config.json'), 'rb').read()
  listing = sorted(os.listdir(workdir))
  proc = _run(*_train_args(root, workdir, '--config.model.width=48',
                           '--config.optimizer.lr=0.01', '--config.total_steps=6'))
  assert proc.returncode == 2
  line = _one_error_line(proc)
  assert 'model.width: 32 -> 48' in line and 'optimizer.lr: 0.0003 -> 0.01' in line, line
  assert 'total_steps' not in line.split('(only')[0]  # a longer run is a resume, not a change
  assert open(os.path.join(workdir, 'config.json'), 'rb').read() == before
  assert sorted(os.listdir(workdir)) == listing
  # Eval of the workdir still works: config.json matches the checkpoints.
  summary = eval_lib.run(workdir, root, 'latest', str(tmp_path / 'sub.csv'))
  assert summary['checkpoint_step'] == 4


def test_a_workdir_written_before_the_added_keys_still_resumes(base_run, tmp_path):
  root, workdir = _copy(base_run, tmp_path)
  path = os.path.join(workdir, 'config.json')
  saved = json.load(open(path))
  for key in train_loop.ADDED_KEYS:  # dotted keys are nested ('data.crop_on')
    *parents, last = key.split('.')
    node = saved
    for part in parents:
      node = node[part]
    del node[last]
  with open(path, 'w') as f:
    json.dump(saved, f)
  proc = _run(*_train_args(root, workdir, '--config.total_steps=5', '--config.eval_every_steps=0',
                           '--config.checkpoint_every_steps=5'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r['step'] for r in _records(workdir)] == [1, 2, 3, 4, 5]
  # A real change of one of them is still refused.
  proc = _run(*_train_args(root, workdir, '--config.ema_decay=0.5'))
  assert proc.returncode == 2 and 'ema_decay: 0.0 -> 0.5' in _one_error_line(proc)


def _damage_model_array(workdir, step):
  files = [p for p in glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'model', '**'),
                                recursive=True) if os.path.isfile(p) and '/d/' in p]
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _damage_data_state(workdir, step):
  files = glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'data', '*'))
  assert files
  for path in files:
    with open(path, 'r+') as f:
      f.truncate(5)


def _remove_train_item(workdir, step):
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step), 'train'))


@pytest.mark.parametrize('damage', [_damage_model_array, _damage_data_state, _remove_train_item])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(base_run, tmp_path, damage):
  root, workdir = _copy(base_run, tmp_path)
  reference = {r['step']: r['loss'] for r in _records(workdir)}
  damage(workdir, 4)
  proc = _run(*_train_args(root, workdir, '--config.total_steps=4', '--config.eval_every_steps=0',
                           '--config.checkpoint_every_steps=2'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stderr.splitlines() if l.startswith('warning: checkpoint step 4')]
  assert len(warnings) == 1 and 'resuming from step 2' in warnings[0], proc.stderr[-3000:]
  assert len(proc.stderr.splitlines()) < 10, proc.stderr  # not 168 lines of Orbax
  assert 'resuming from step 2' in proc.stdout
  assert os.path.isdir(os.path.join(workdir, checkpoint.DAMAGED, '4'))  # kept, not deleted
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  # Steps 3-4 redone from step 2 give the losses of the first run.
  records = _records(workdir)
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert r['loss'] == pytest.approx(reference[r['step']], rel=1e-5)


def test_no_intact_checkpoint_is_a_one_line_failure(base_run, tmp_path):
  root, workdir = _copy(base_run, tmp_path)
  for step in (2, 4):
    _remove_train_item(workdir, step)
  proc = _run(*_train_args(root, workdir, '--config.total_steps=6'))
  assert proc.returncode == 1
  line = _one_error_line(proc)
  assert 'no checkpoint' in line and 'step 4:' in line and 'step 2:' in line, line
  assert not os.path.exists(os.path.join(workdir, checkpoint.DAMAGED))


# ------------------------------------------------------------------ the console


def test_a_run_prints_no_library_info_lines(base_run):
  # The module fixture's run: Orbax's INFO lines (hundreds per run) stay off the console.
  root, workdir = base_run
  proc = _run(*_train_args(root, workdir + '-quiet', '--config.total_steps=2',
                           '--config.eval_every_steps=0', '--config.checkpoint_every_steps=1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  foreign = [l for l in proc.stderr.splitlines() if l.strip() and not _project_log_line(l)]
  assert not foreign, foreign[:5]
  assert 'Closing _NonBlockingMetadataStore' not in proc.stderr


@pytest.mark.parametrize('args,code,message', [
    (('--config.ema_decai=0.9',), 2, 'Did you mean "ema_decay"'),
    (('--config.batch_size=abc',), 2, '--config.batch_size=abc'),
    (('--config.batch_size=0',), 2, 'config.batch_size=0: must be a positive integer'),
    (('--config.data.root=/nonexistent',), 2, 'no manifest.jsonl'),
    (('--steps=3',), 2, 'Unknown command line flag'),
])
def test_train_usage_errors_are_one_line(synthetic_converted, tmp_path, args, code, message):
  proc = _run(*_train_args(synthetic_converted[1], str(tmp_path / 'w'), *args))
  assert proc.returncode == code, proc.stderr[-3000:]
  assert message in _one_error_line(proc)
  assert not os.path.exists(tmp_path / 'w')


def test_a_missing_config_file_is_a_usage_error(tmp_path):
  proc = _run('cspine_jax.train', '--config=configs/nope.py', f'--workdir={tmp_path / "w"}')
  assert proc.returncode == 2 and 'configs/nope.py' in _one_error_line(proc)


@pytest.mark.parametrize('name', ['smoke', 'demo', 'bench_cpu', 'vit_b1', 'vit_b2', 'localizer',
                                  'vertebra', 'cnn_vertebra', 'cnn25d_lstm', 'vertebra_distill'])
def test_every_shipped_config_passes_validation(name, synthetic_converted, tmp_path):
  module = __import__(f'configs.{name}', fromlist=['get_config'])
  config = module.get_config()
  config.data.root = synthetic_converted[1]
  if 'distill' in config:
    teacher = tmp_path / 'teacher'
    teacher.mkdir()
    (teacher / 'config.json').write_text('{}')
    config.distill.teacher_workdir = str(teacher)
  train_loop.validate_config(config)


@pytest.mark.parametrize('key,value,message', [
    ('optimizer.lr', -1.0, 'config.optimizer.lr=-1.0: must be > 0'),
    ('optimizer.schedule', 'linear', "config.optimizer.schedule='linear'"),
    ('data.spacing_mm', (0.0, 1.0, 1.0), 'config.data.spacing_mm=(0.0, 1.0, 1.0)'),
    ('data.windows', ((400.0, -1.0),), 'width > 0'),
    ('data.input_shape', (15, 32, 32), 'not a whole number of config.model.patch_size'),
    ('model.in_channels', 2, 'config.model.in_channels=2 but config.data.windows has 1'),
    ('data.cache_mb', -1, 'config.data.cache_mb=-1'),
])
def test_values_that_used_to_train_or_fail_late_are_config_errors(smoke_config, tmp_path, key,
                                                                  value, message):
  block, _, name = key.rpartition('.')
  smoke_config[block][name] = value
  with pytest.raises(train_loop.ConfigError, match=re.escape(message)):
    train_loop.train_and_evaluate(smoke_config, str(tmp_path / 'w'), progress=False)


def test_eval_of_a_damaged_checkpoint_names_it_and_the_others(base_run, tmp_path):
  root, workdir = _copy(base_run, tmp_path)
  _damage_model_array(workdir, 4)
  out = str(tmp_path / 'sub.csv')
  proc = _run('cspine_jax.eval', f'--workdir={workdir}', f'--data={root}', f'--output={out}')
  assert proc.returncode == 1
  line = _one_error_line(proc)
  assert 'checkpoint step 4' in line and 'other kept steps: [2]' in line, line
  assert not os.path.exists(out)
  assert eval_lib.run(workdir, root, '2', out)['checkpoint_step'] == 2


def test_error_messages_are_unwrapped_not_mangled():
  nested = AttributeError(KeyError('\'ema_decai\'\nDid you mean "ema_decay" instead of "ema_decai"?'))
  assert cli._message(nested) == 'ema_decai Did you mean "ema_decay" instead of "ema_decai"?'
  missing = FileNotFoundError(2, 'No such file or directory', '/data/x.csv')
  assert cli._message(missing) == "[Errno 2] No such file or directory: '/data/x.csv'"
  assert cli._message(ValueError('a.csv:3: column C1: \'yes\' is not 0 or 1')) == (
      "a.csv:3: column C1: 'yes' is not 0 or 1")
