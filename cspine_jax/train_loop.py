"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m cspine_jax.train`.

The loop only: the step is `train_lib`'s pure function, evaluation `evaluate`'s loops over a
predict function jitted here once, checkpoints `checkpoint`'s. Step metrics stay on the device
and are fetched at log steps (big_vision); a device-side finite flag is checked before every
save, so no checkpoint of a diverged state is ever written.
"""
from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from cspine_jax import checkpoint
from cspine_jax import cli
from cspine_jax import evaluate
from cspine_jax import parallel
from cspine_jax import restore
from cspine_jax import train_lib
from cspine_jax.data import config as data_config
from cspine_jax.data import device_blocks
from cspine_jax.data import manifest
from cspine_jax.data import pipeline
from cspine_jax.data import transforms
from cspine_jax.data import store
from cspine_jax.models import factory

ConfigError = factory.ConfigError  # a config value that cannot work; the message names the key


def validate_config(config) -> None:
  """Fails early, naming the key, on values that would fail (or mislead) later."""
  def positive_int(key, value):
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'config.{key}={value!r}: must be a positive integer')

  for key in ('batch_size', 'total_steps', 'checkpoint_every_steps', 'log_every_steps'):
    positive_int(key, config.get(key))
  if config.get('eval_every_steps', 0):
    positive_int('eval_every_steps', config.eval_every_steps)
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ConfigError(f'config.batch_size={config.batch_size}: must be divisible by the '
                      f'{devices} devices of the mesh')
  accum = config.get('grad_accum_steps', 1)
  positive_int('grad_accum_steps', accum)
  if (config.batch_size // jax.process_count()) % accum:
    raise ConfigError(f'config.grad_accum_steps={accum}: must divide the per-process batch '
                      f'{config.batch_size // jax.process_count()}')
  _check_ranges(config)
  task = factory.check(config)  # model name, mode, crop mode, crop shape and loss agree
  _check_shapes(config, task)
  _check_crop_on(config)
  root = config.data.get('root', '')
  if not root:
    raise ConfigError('config.data.root is empty: set it to a folder written by '
                      'python -m data_tools.convert (--config.data.root=...)')
  store.dataset(root, 'config.data.root', error=ConfigError)  # a folder or bucket
  if config.get('param_sharding', 'replicate') not in parallel.PARAM_SHARDINGS:
    raise ConfigError(f'config.param_sharding={config.param_sharding!r}: expected one of '
                      f'{parallel.PARAM_SHARDINGS}')
  positive_int('keep_latest_checkpoints', config.get('keep_latest_checkpoints', 2))
  keep_best = config.get('keep_best_checkpoints', 1)
  if not isinstance(keep_best, int) or keep_best < 0:
    raise ConfigError(f'config.keep_best_checkpoints={keep_best!r}: must be an integer >= 0')
  distill = config.get('distill', None)
  if distill is not None and not distill.get('teacher_workdir'):
    # A distillation config without its teacher would train the student alone and exit 0.
    raise ConfigError('config.distill.teacher_workdir is empty: this config distils from a '
                      'teacher; set --config.distill.teacher_workdir=W (a workdir of this repo, '
                      'e.g. configs/cnn_vertebra.py)')
  if distill is not None and not os.path.isfile(os.path.join(distill.teacher_workdir,
                                                             'config.json')):
    raise ConfigError(f'config.distill.teacher_workdir={distill.teacher_workdir!r}: not a '
                      'training workdir (no config.json)')
  if not 0.0 <= float(config.get('ema_decay', 0.0)) < 1.0:
    raise ConfigError(f'config.ema_decay={config.ema_decay}: must be in [0, 1)')
  if not 0.0 <= float(config.get('label_smoothing', 0.0)) < 1.0:
    raise ConfigError(f'config.label_smoothing={config.label_smoothing}: must be in [0, 1)')
  box_prob = float(config.data.get('vertebra_predicted_box_prob', 0.0))
  if not 0.0 <= box_prob <= 1.0:
    raise ConfigError(f'config.data.vertebra_predicted_box_prob={box_prob}: must be in [0, 1]')
  jitter = float(config.data.get('vertebra_box_jitter_mm', 0.0))
  if not jitter >= 0.0:
    raise ConfigError(f'config.data.vertebra_box_jitter_mm={jitter}: must be >= 0 (mm)')
  mix_alpha = float(config.get('mixup_alpha', 0.0))
  if mix_alpha < 0.0 or (mix_alpha and task.segmentation):
    raise ConfigError(f'config.mixup_alpha={config.mixup_alpha}: must be >= 0, and 0 for the '
                      'localizer (its per-voxel labels are not mixed)')


def check_coarse_localizer(config, task) -> None:
  """A localizer that crops around the spine names its coarse pass (configs/localizer.py):
  checked now, not when data_tools.localize first needs it, and kept as an absolute path."""
  if not task.segmentation or config.data.get('crop_mode') == 'volume':
    return
  config.localizer.coarse_workdir = restore.coarse_localizer_workdir(config)


def check_data(config, task) -> bool:
  """Fails at start, naming the keys, when there is nothing to train on (never after training);
  returns whether the periodic evaluation has studies to run on."""
  root = config.data.root
  studies = manifest.load_manifest(root)
  if not studies:
    raise ConfigError(f'config.data.root={root!r}: the manifest lists no converted study (the '
                      'failed ones and their reasons are in manifest.jsonl)')
  try:
    train = pipeline.split_studies(config, 'train')
    held_out = pipeline.split_studies(config, 'eval')
  except ValueError as e:  # e.g. a fold outside [0, num_folds)
    raise ConfigError(f'config.data.fold / num_folds: {e}') from None
  try:
    pipeline.check_levels(config, train + held_out)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if task.segmentation:
    held_out = [s for s in held_out if s.has_segmentation]
  if not train:
    d = config.data
    labelled = [s for s in studies if s.labels is not None and s.split != 'test']
    raise ConfigError(
        f'config.data.root={root!r}: no training study: {len(studies)} converted, '
        f'{len(labelled)} labelled, {sum(s.has_segmentation for s in labelled)} with masks, '
        f'{sum(bool(s.boxes) for s in labelled)} with vertebra boxes; data.fold={d.fold} of '
        f'{d.num_folds}, data.require_segmentation={d.get("require_segmentation", False)}, '
        f'data.require_boxes={d.get("require_boxes", False)}')
  if config.get('eval_every_steps', 0) and not held_out:
    cli.warn(f'config.eval_every_steps={config.eval_every_steps} but data.fold='
             f'{config.data.fold} holds out no study{" with a mask" if task.segmentation else ""}'
             ': periodic evaluation skipped (the best-checkpoint policy then keeps the latest '
             'only; evaluate with python -m cspine_jax.eval on a held-out set)')
    return False
  return bool(config.get('eval_every_steps', 0))


# Keys a rerun may change without making the checkpoints another run's: how long it goes, how
# often it logs, evaluates and saves, and where and how the data is read.
RESUMABLE_KEYS = frozenset({
    'total_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
    'keep_latest_checkpoints', 'keep_best_checkpoints', 'data.root', 'data.num_threads',
    'data.num_workers', 'data.prefetch', 'data.cache_mb', 'data.device_prefetch',
    'data.levels', 'distill.teacher_workdir'})


# Keys that configs gained after workdirs were written without them, with the value the code
# used when they were absent: an older workdir resumes unless one of them is really changed.
ADDED_KEYS = {'keep_latest_checkpoints': 2, 'keep_best_checkpoints': 1, 'grad_accum_steps': 1,
              'ema_decay': 0.0, 'param_sharding': 'replicate', 'dice_weight': 1.0,
              'token_loss_weight': 0.0, 'data.crop_on': 'host'}


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_resume_config(config, workdir: str, has_checkpoint: bool) -> None:
  """A rerun of a workdir with checkpoints must be the same run: refuses (writing nothing) with
  the changed keys otherwise, so config.json never disagrees with the checkpoints."""
  path = os.path.join(workdir, 'config.json')
  if not has_checkpoint or not os.path.isfile(path):
    return
  with open(path) as f:
    old = {**ADDED_KEYS, **_flat(json.load(f))}
  new = _flat(json.loads(config.to_json_best_effort()))
  changed = sorted(k for k in old.keys() | new.keys()
                   if old.get(k, '<absent>') != new.get(k, '<absent>') and k not in RESUMABLE_KEYS)
  if changed:
    shown = '; '.join(f'{k}: {old.get(k, "<absent>")!r} -> {new.get(k, "<absent>")!r}'
                      for k in changed[:8])
    more = f' (and {len(changed) - 8} more)' if len(changed) > 8 else ''
    raise ConfigError(
        f'--workdir={workdir} holds checkpoints of another config: {shown}{more}. Resume with '
        f'the config in {path}, or use a new --workdir (only {", ".join(sorted(RESUMABLE_KEYS))}'
        ' may change on a rerun)')


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# (key, test, what it must be): values that would otherwise train silently on nonsense (a
# negative learning rate, a zero spacing) or fail deep inside a library after the start.
_RANGES = (
    ('seed', lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    ('optimizer.name', lambda v: v in ('adamw',), '"adamw"'),
    ('optimizer.schedule', lambda v: v in ('cosine', 'constant'), '"cosine" or "constant"'),
    ('optimizer.lr', lambda v: isinstance(v, (int, float)) and v > 0, '> 0'),
    ('optimizer.warmup_steps', lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    ('optimizer.grad_clip_norm', lambda v: isinstance(v, (int, float)) and v >= 0,
     '>= 0 (0 = off)'),
    ('optimizer.weight_decay', lambda v: isinstance(v, (int, float)) and v >= 0, '>= 0'),
    ('optimizer.b1', lambda v: isinstance(v, (int, float)) and 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.b2', lambda v: isinstance(v, (int, float)) and 0 <= v < 1, 'in [0, 1)'),
    ('data.num_threads', lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    ('data.num_workers', lambda v: _is_int(v) and v >= 0, 'an integer >= 0 (0 = threads only)'),
    ('data.prefetch', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    ('data.cache_mb', lambda v: isinstance(v, (int, float)) and v >= 0, '>= 0'),
    ('data.spacing_mm', lambda v: len(v) == 3 and all(x > 0 for x in v), '3 values > 0 (mm)'),
    ('data.vertebra_spacing_mm', lambda v: len(v) == 3 and all(x > 0 for x in v),
     '3 values > 0 (mm)'),
    ('data.windows', lambda v: len(v) >= 1 and all(len(w) == 2 and w[1] > 0 for w in v),
     '(center, width) pairs with width > 0'),
    ('data.augment.scale', lambda v: 0 <= v < 1, 'in [0, 1) (zoom in [1 - s, 1 + s])'),
    ('data.augment.scale_z', lambda v: 0 <= v < 1, 'in [0, 1) (z zoom in [1 - s, 1 + s])'),
    ('data.augment.flip_x_prob', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('data.augment.fov_cut_prob', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('data.augment.fov_cut_mm', lambda v: len(v) == 2 and all(x >= 0 for x in v),
     '(top, bottom) >= 0 (mm)'),
    ('model.dtype', lambda v: v in ('float32', 'bfloat16', 'float16'),
     '"float32", "bfloat16" or "float16"'),
    ('model.param_dtype', lambda v: v in ('float32', 'bfloat16'), '"float32" or "bfloat16"'),
)


def _lookup(config, key):
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return None, False
    node = node[part]
  return node, True


def _check_ranges(config) -> None:
  for key, ok, what in _RANGES:
    value, present = _lookup(config, key)
    if not present:
      continue
    try:
      good = ok(value)
    except TypeError:
      good = False
    if not good:
      raise ConfigError(f'config.{key}={value!r}: must be {what}')


def _check_crop_on(config) -> None:
  """data.crop_on: a known value, and 'device' only where device crops serve the config."""
  data = data_config.resolve(config)
  if data.crop_on not in transforms.CROP_ON:
    raise ConfigError(f'config.data.crop_on={data.crop_on!r}: expected one of '
                      f'{transforms.CROP_ON}')
  if data.crop_on == 'device':
    try:
      device_blocks.check_config(data)
    except ValueError as e:
      raise ConfigError(str(e)) from None


def _check_shapes(config, task) -> None:
  """The crop shape: positive, one window per input channel, whole patches for a ViT."""
  key = f'data.{task.shape_key}'
  shape, _ = _lookup(config, key)
  if not shape or len(shape) != 3 or not all(_is_int(n) and n > 0 for n in shape):
    raise ConfigError(f'config.{key}={shape!r}: must be 3 positive integers (z, y, x)')
  channels = config.model.get('in_channels', None)
  if channels is not None and channels != len(config.data.windows):
    raise ConfigError(f'config.model.in_channels={channels} but config.data.windows has '
                      f'{len(config.data.windows)} windows: one input channel per window')
  patch = config.model.get('patch_size', None)
  if config.model.get('name') == 'vit3d' and patch is not None and any(
      n % p for n, p in zip(shape, patch)):
    raise ConfigError(f'config.{key}={tuple(shape)} is not a whole number of '
                      f'config.model.patch_size={tuple(patch)} patches')


class MetricWriter:
  """metrics.jsonl and TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int | None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    if resume_step is not None and os.path.exists(self.path):
      # Lines after the restored step were written by the killed run and are redone now.
      store.atomic_write(self.path, ''.join(read_metrics_lines(self.path, resume_step)))
    # purge_step: TensorBoard drops the killed run's events at steps after the restored one
    # (they are redone now), so its curves hold each step once.
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                             purge_step=resume_step + 1 if resume_step is not None else None)

  def write(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _plain(v) for k, v in values.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics_lines(path: str, up_to_step: int) -> list[str]:
  """The lines of metrics.jsonl at steps <= ``up_to_step``; a line that is not JSON (what a
  ``kill -9`` during an append leaves at the end) is dropped with a warning naming it."""
  keep = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        cli.warn(f'{path}:{number}: not a JSON line (torn by a killed run?): dropped')
        continue
      if record.get('step', 0) <= up_to_step:
        keep.append(line if line.endswith('\n') else line + '\n')
  return keep


def _plain(v):
  """JSON-safe: numpy to Python, non-finite floats to null (strict JSON has no NaN)."""
  v = np.asarray(v)
  if v.ndim:
    return [_plain(x) for x in v]
  v = v.item()
  return None if isinstance(v, float) and not math.isfinite(v) else v


def _save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    store.atomic_write(os.path.join(workdir, 'config.json'),
                       config.to_json_best_effort(indent=2, sort_keys=True))


def _make_teacher(config, mesh):
  """(pure teacher fn, its weights) of config.distill.teacher_workdir, or (None, None)."""
  distill = config.get('distill', None)
  if not distill or not distill.get('teacher_workdir'):
    return None, None
  teacher = restore.InferenceModel(distill.teacher_workdir,
                                   distill.get('teacher_checkpoint', 'latest'), mesh,
                                   expect='classifier')
  t_config = teacher.config
  logging.info('distillation teacher: %s step %d (%s)', distill.teacher_workdir, teacher.step,
               t_config.model.name)
  if float(distill.get('feature_weight', 0.0)):
    widths = t_config.model.get('widths') if t_config.model.get('name') == 'cnn3d' else None
    if not widths or int(widths[-1]) != int(config.model.get('hint_dim', 0)):
      raise ConfigError(
          f'config.distill.feature_weight={distill.feature_weight} needs a 3D CNN teacher '
          f'(model.name "cnn3d", its last width = config.model.hint_dim='
          f'{config.model.get("hint_dim", 0)}); {distill.teacher_workdir} has model.name '
          f'{t_config.model.get("name")!r}, widths {widths}')
  return teacher.teacher()


@jax.jit
def _first_bad_step(first_bad: jax.Array, finite: jax.Array, step: jax.Array) -> jax.Array:
  """The first step whose loss or gradient was not finite (0 while every step was)."""
  return jnp.where((first_bad == 0) & ~finite, step, first_bad)


def check_workdir(workdir: str) -> None:
  """Refuses, at start, a --workdir in a bucket: ConfigError naming it and what to do instead.

  Orbax writes checkpoints to gs:// (through etils.epath, with gcsfs installed) but not to s3://,
  and the rest of a workdir cannot live in any bucket: metrics.jsonl is appended to line by line
  (objects cannot be appended to), TensorBoard's event files likewise, and a damaged checkpoint
  is moved aside by a rename. Found after an hour of training, that would lose the hour.
  """
  scheme = workdir.split('://', 1)[0] if '://' in workdir else ''
  if scheme:
    why = {'s3': 'Orbax cannot write checkpoints to S3',
           'file': 'give it as a path'}.get(
               scheme, 'metrics.jsonl and TensorBoard are appended to, which objects cannot be')
    raise ConfigError(f'--workdir={workdir}: must be a local folder ({why}); train into a local '
                      'disk or a bucket mounted as a folder (gcsfuse, mountpoint-s3), or copy the '
                      'workdir up afterwards (gcloud storage rsync / aws s3 sync). The data '
                      '(config.data.root) may be a bucket.')


def train_and_evaluate(config, workdir: str, progress: bool = True) -> dict:
  """Trains to config.total_steps (resuming if a checkpoint exists); returns the last metrics."""
  # ------------------------------------------------------------------ setup
  check_workdir(workdir)
  validate_config(config)
  task = factory.task_of(config)
  check_coarse_localizer(config, task)
  eval_every = int(config.eval_every_steps) if check_data(config, task) else 0
  check_resume_config(config, workdir, bool(checkpoint.steps_on_disk(workdir)))
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  graphdef = nnx.graphdef(factory.abstract_model(config))
  init = train_lib.init_fn(config)
  abstract_state = jax.eval_shape(init)
  sharding_mode = config.get('param_sharding', 'replicate')
  replicated = parallel.replicated(mesh)
  state_sharding = abstract_state.replace(
      params=parallel.param_sharding(mesh, abstract_state.params, sharding_mode),
      opt_state=parallel.param_sharding(mesh, abstract_state.opt_state, sharding_mode),
      ema=parallel.param_sharding(mesh, abstract_state.ema, sharding_mode),
      step=replicated, rest=jax.tree.map(lambda _: replicated, abstract_state.rest),
      rng=replicated)
  batch_sharding = parallel.batch_sharding(mesh)
  host_iter, num_train = pipeline.make_train_iterator(config)
  train_iter = pipeline.DevicePrefetch(host_iter, batch_sharding,
                                       int(config.data.get('device_prefetch', 2)))
  mngr = checkpoint.manager(workdir, config)
  if not mngr.all_steps():
    # Born sharded: each device computes only its own shards of the initial state.
    state = jax.jit(init, out_shardings=state_sharding)()
    start = 0
  else:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state, state_sharding)
    mngr, start, state = checkpoint.restore_latest_intact(mngr, workdir, config, target,
                                                          train_iter)
    print(f'[train] resuming from step {start} ({workdir}/checkpoints/{start})', flush=True)
  _save_config(config, workdir)  # only now: a refused or failed restore leaves it as it was
  writer = MetricWriter(workdir, start if start else None)
  teacher, teacher_weights = _make_teacher(config, mesh)
  step_fn = train_lib.make_train_step(config, graphdef, teacher)
  p_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sharding, None))
  # Built once: every periodic evaluation reuses this compiled function.
  p_apply = jax.jit(restore.make_apply(graphdef, 'labels' if task.segmentation else 'probs'))
  logging.info('training %d studies, global batch %d on %d devices (%d processes), steps %d..%d',
               num_train, config.batch_size, jax.device_count(), jax.process_count(), start,
               config.total_steps)

  # ------------------------------------------------------------------ loop
  bar = None
  if progress and jax.process_index() == 0:
    bar = tqdm(total=config.total_steps, initial=start, unit='step', desc='train', smoothing=0.1)
  last_log_time, last_log_step = time.perf_counter(), start
  last = {}
  first_bad = jnp.zeros((), jnp.int32)

  def check_finite():
    """Stops before anything is written from a diverged state (one host sync)."""
    bad = int(first_bad)
    if bad:
      mngr.wait_until_finished()
      raise FloatingPointError(
          f'non-finite loss or gradient norm at step {bad}; stopped without saving (latest '
          f'good checkpoint: {mngr.latest_step()}). Lower config.optimizer.lr or set '
          'config.optimizer.grad_clip_norm.')

  for step in range(start + 1, config.total_steps + 1):
    state, m = p_step(state, next(train_iter), teacher_weights)
    first_bad = _first_bad_step(first_bad, m.pop('finite'), step)
    if bar:
      bar.update(1)
    if step % config.log_every_steps == 0 or step == config.total_steps:
      check_finite()
      m = {k: float(v) for k, v in jax.device_get(m).items()}  # the only per-log host sync
      if bar:
        bar.set_postfix(loss=f'{m["loss"]:.4f}')
      now = time.perf_counter()
      m['samples_per_s'] = (step - last_log_step) * config.batch_size / max(now - last_log_time,
                                                                            1e-9)
      m['epoch'] = step * config.batch_size / num_train
      writer.write(step, m)
      last_log_time, last_log_step = now, step
      last = m
    eval_result = None
    if eval_every and (step % eval_every == 0 or step == config.total_steps):
      check_finite()
      weights = restore.inference_weights(config, state)
      eval_result = evaluate.task_metrics(config, task, lambda x: p_apply(weights, x), mesh)
      if eval_result:
        writer.write(step, eval_result)
        logging.info('step %d eval: %s', step, {k: round(v, 4) for k, v in eval_result.items()
                                                 if isinstance(v, float)})
        last = {**last, **eval_result}
      last_log_time = time.perf_counter()  # evaluation time is not training throughput
    if step % config.checkpoint_every_steps == 0 or step == config.total_steps:
      check_finite()
      # The localizer has no RSNA score: its checkpoints are kept by recency only.
      checkpoint.save(mngr, step, state, train_iter,
                      metrics={checkpoint.BEST_METRIC: eval_result[checkpoint.BEST_METRIC]}
                      if eval_result and checkpoint.BEST_METRIC in eval_result else None)
  # ------------------------------------------------------------------ done
  check_finite()
  if bar:
    bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  train_iter.close()
  jax.effects_barrier()
  return last
