"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m cspine_jax.train`."""
from __future__ import annotations

import json
import math
import os
import time

from absl import logging
from flax import nnx
import jax
import numpy as np

from cspine_jax import checkpoint
from cspine_jax import metrics as metrics_lib
from cspine_jax import parallel
from cspine_jax import train_lib
from cspine_jax.data import pipeline


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


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
  root = config.data.get('root', '')
  if not root:
    raise ConfigError('config.data.root is empty: set it to a folder written by '
                      'python -m data_tools.convert (--config.data.root=...)')
  if not os.path.isfile(os.path.join(root, 'manifest.jsonl')):
    raise ConfigError(f'config.data.root={root!r}: no manifest.jsonl there (run '
                      'python -m data_tools.convert first)')
  if not 0.0 <= float(config.get('ema_decay', 0.0)) < 1.0:
    raise ConfigError(f'config.ema_decay={config.ema_decay}: must be in [0, 1)')
  if not 0.0 <= float(config.get('label_smoothing', 0.0)) < 1.0:
    raise ConfigError(f'config.label_smoothing={config.label_smoothing}: must be in [0, 1)')
  box_prob = float(config.data.get('vertebra_predicted_box_prob', 0.0))
  if not 0.0 <= box_prob <= 1.0:
    raise ConfigError(f'config.data.vertebra_predicted_box_prob={box_prob}: must be in [0, 1]')
  mix_alpha = float(config.get('mixup_alpha', 0.0))
  if mix_alpha < 0.0 or (mix_alpha and train_lib.is_segmentation(config)):
    raise ConfigError(f'config.mixup_alpha={config.mixup_alpha}: must be >= 0, and 0 for the '
                      'localizer (its per-voxel labels are not mixed)')
  if train_lib.is_segmentation(config):
    if config.loss != 'ce_dice':
      raise ConfigError(f'config.loss={config.loss!r}: model.mode="segment" trains with '
                        '"ce_dice" (softmax cross-entropy + soft Dice)')
    if config.data.get('crop_mode') != 'volume':
      raise ConfigError(f'config.data.crop_mode={config.data.get("crop_mode")!r}: '
                        'model.mode="segment" reads whole volumes ("volume")')
  elif config.loss not in ('bce', 'rsna_weighted'):
    raise ConfigError(f'config.loss={config.loss!r}: expected "bce" or "rsna_weighted"')


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
      with open(self.path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= resume_step]
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # pragma: no cover - tensorboardX is a declared dependency
      logging.warning('tensorboardX missing: no TensorBoard files')

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


def _plain(v):
  """JSON-safe: numpy to Python, non-finite floats to null (strict JSON has no NaN)."""
  v = np.asarray(v)
  if v.ndim:
    return [_plain(x) for x in v]
  v = v.item()
  return None if isinstance(v, float) and not math.isfinite(v) else v


def _save_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  tmp = os.path.join(workdir, 'config.json.tmp')
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, 'config.json'))


def load_config(workdir: str):
  """The resolved config a run saved in its workdir."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: not a training workdir (no config.json)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_frozen_model(workdir: str, which: str = 'latest', mesh=None):
  """A trained model of any workdir: (config, graphdef, state, step), state on the mesh."""
  config = load_config(workdir)
  mesh = mesh or parallel.make_mesh()

  def init():
    return train_lib.init_state(config, train_lib.build_model(config, int(config.seed)))

  # Shapes only: no eager random initialisation of weights the checkpoint replaces (seconds per
  # model on CPU, which predict pays for both of its models).
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: train_lib.build_model(config, int(config.seed))))
  replicated = parallel.replicated(mesh)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       jax.eval_shape(lambda: init()[1]))
  mngr = checkpoint.manager(workdir, config, read_only=True)
  step = checkpoint.resolve_step(mngr, which)
  state = checkpoint.restore(mngr, step, state)
  mngr.close()
  return config, graphdef, state, step


def evaluate(config, graphdef, state, mesh, split: str = 'eval', uids=None) -> dict:
  """Predicts every study of ``split`` once; returns {uids, probs, labels, labelled} on host."""
  predict = jax.jit(train_lib.make_predict_fn(graphdef, use_ema=bool(config.get('ema_decay'))))
  it, count = pipeline.make_eval_iterator(config, split, uids=uids)
  out = {'uids': [], 'probs': [], 'labels': [], 'labelled': []}
  sharding = parallel.batch_sharding(mesh)
  for batch in it:
    # Every process runs every batch (even all-padding ones) so collectives stay in step.
    g = pipeline.to_global(batch, sharding)
    probs = parallel.host_value(predict(state, g['image']))
    mask = parallel.host_value(g['mask']).astype(bool)
    labels = parallel.host_value(g['labels'])
    labelled = parallel.host_value(g['labelled']).astype(bool) if 'labelled' in g else mask
    out['probs'].append(probs[mask])
    out['labels'].append(labels[mask])
    out['labelled'].append(labelled[mask])
    out['uids'].extend(_global_uids(batch['uid'], mask))
  close = getattr(it, 'close', None)
  if close:
    close()
  result = {k: (np.concatenate(v) if k != 'uids' else v) for k, v in out.items()}
  if len(result['probs']) != count:
    raise RuntimeError(f'evaluation saw {len(result["probs"])} studies, expected {count}')
  return result


def evaluate_segmentation(config, graphdef, state, mesh, split: str = 'eval', uids=None) -> dict:
  """Segments every study of ``split`` that has a true mask; returns {uids, dice (n, 7)}.

  Dice is computed at the localizer's resolution: the argmax labels against the true mask
  resampled (nearest) onto the same grid, i.e. exactly what the model was trained to output.
  """
  from cspine_jax import seg_metrics  # pylint: disable=g-import-not-at-top
  segment = jax.jit(train_lib.make_segment_fn(graphdef, use_ema=bool(config.get('ema_decay'))))
  it, _ = pipeline.make_eval_iterator(config, split, uids=uids)
  sharding = parallel.batch_sharding(mesh)
  out_uids, dice = [], []
  for batch in it:
    g = pipeline.to_global(batch, sharding)
    pred = parallel.host_value(segment(state, g['image']))
    true = parallel.host_value(g['segmentation'])
    keep = parallel.host_value(g['mask']).astype(bool) & parallel.host_value(
        g['has_segmentation']).astype(bool)
    for u, p, t, k in zip(_global_uids(batch['uid'], np.ones(len(pred), bool)), pred, true,
                          keep):
      if k:
        out_uids.append(u)
        dice.append(seg_metrics.dice_per_class(p, t))
  close = getattr(it, 'close', None)
  if close:
    close()
  return {'uids': out_uids, 'dice': np.asarray(dice).reshape(-1, 7)}


def segmentation_metrics(result: dict) -> dict:
  from cspine_jax import seg_metrics  # pylint: disable=g-import-not-at-top
  if not len(result['dice']):
    return {}
  return {f'eval_{k}': v for k, v in seg_metrics.summarize(result['dice']).items()}


def _global_uids(local_uids, global_mask) -> list[str]:
  """UIDs of the global batch rows (process-local strings gathered across processes)."""
  local = [str(u) for u in np.asarray(local_uids)]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    width = 64
    codes = np.zeros((len(local), width), np.uint8)
    for i, u in enumerate(local):
      b = u.encode()[:width]
      codes[i, :len(b)] = np.frombuffer(b, np.uint8)
    allc = np.asarray(multihost_utils.process_allgather(codes, tiled=True))
    local = [bytes(r).rstrip(b'\0').decode() for r in allc]
  return [u for u, m in zip(local, global_mask) if m]


def eval_metrics(result: dict) -> dict:
  keep = result['labelled']
  if not keep.any():
    return {}
  rep = metrics_lib.report(result['labels'][keep], result['probs'][keep])
  return {f'eval_{k}': v for k, v in rep.items()}


def _make_teacher(config, mesh):
  distill = config.get('distill', None)
  if not distill or not distill.get('teacher_workdir'):
    return None, None
  t_config, t_graphdef, t_state, t_step = load_frozen_model(
      distill.teacher_workdir, distill.get('teacher_checkpoint', 'latest'), mesh)
  logging.info('distillation teacher: %s step %d (%s)', distill.teacher_workdir, t_step,
               t_config.model.name)
  if float(distill.get('feature_weight', 0.0)):
    widths = t_config.model.get('widths') if t_config.model.get('name') == 'cnn3d' else None
    if not widths or int(widths[-1]) != int(config.model.get('hint_dim', 0)):
      raise ConfigError(
          f'config.distill.feature_weight={distill.feature_weight} needs a 3D CNN teacher '
          f'(model.name "cnn3d", its last width = config.model.hint_dim='
          f'{config.model.get("hint_dim", 0)}); {distill.teacher_workdir} has model.name '
          f'{t_config.model.get("name")!r}, widths {widths}')
  outputs = train_lib.make_teacher_fn(t_graphdef)
  return (lambda tp, images: outputs(tp[0], tp[1], images)), (t_state.params, t_state.rest)


def train_and_evaluate(config, workdir: str, progress: bool = True) -> dict:
  """Trains to config.total_steps (resuming if a checkpoint exists); returns the last metrics."""
  # ------------------------------------------------------------------ setup
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  _save_config(config, workdir)
  mesh = parallel.make_mesh()
  model = train_lib.build_model(config, int(config.seed))
  graphdef, state = train_lib.init_state(config, model)
  del model
  state_sharding = state.replace(
      params=parallel.param_sharding(mesh, state.params, config.get('param_sharding',
                                                                     'replicate')),
      opt_state=parallel.param_sharding(mesh, state.opt_state,
                                        config.get('param_sharding', 'replicate')),
      ema=parallel.param_sharding(mesh, state.ema, config.get('param_sharding', 'replicate')),
      step=parallel.replicated(mesh), rest=jax.tree.map(lambda _: parallel.replicated(mesh),
                                                          state.rest),
      rng=parallel.replicated(mesh))
  state = jax.device_put(state, state_sharding)
  train_iter, num_train = pipeline.make_train_iterator(config)
  mngr = checkpoint.manager(workdir, config)
  start = mngr.latest_step()
  if start is not None:
    state = checkpoint.restore(mngr, start, state, train_iter)
    logging.info('resuming from checkpoint step %d in %s', start, workdir)
    print(f'[train] resuming from step {start} ({workdir}/checkpoints/{start})', flush=True)
  start = int(start or 0)
  writer = MetricWriter(workdir, start if start else None)
  teacher, teacher_params = _make_teacher(config, mesh)
  step_fn = train_lib.make_train_step(config, graphdef, teacher)
  batch_sharding = parallel.batch_sharding(mesh)
  p_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sharding, None))
  logging.info('training %d studies, global batch %d on %d devices (%d processes), steps %d..%d',
               num_train, config.batch_size, jax.device_count(), jax.process_count(), start,
               config.total_steps)

  # ------------------------------------------------------------------ loop
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=config.total_steps, initial=start, unit='step', desc='train', smoothing=0.1)
  last_log_time, last_log_step = time.perf_counter(), start
  last = {}
  eval_every = int(config.get('eval_every_steps', 0) or 0)
  for step in range(start + 1, config.total_steps + 1):
    batch = pipeline.to_global(next(train_iter), batch_sharding)
    batch = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
    state, m = p_step(state, batch, teacher_params)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    # NaN guard: stop before anything is written from a diverged state.
    if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])):
      mngr.wait_until_finished()
      raise FloatingPointError(
          f'non-finite loss {m["loss"]} / grad_norm {m["grad_norm"]} at step {step}; stopped '
          f'without saving (latest good checkpoint: {mngr.latest_step()}). Lower '
          'config.optimizer.lr or set config.optimizer.grad_clip_norm.')
    if bar:
      bar.update(1)
      bar.set_postfix(loss=f'{m["loss"]:.4f}')
    if step % config.log_every_steps == 0 or step == config.total_steps:
      now = time.perf_counter()
      m['samples_per_s'] = (step - last_log_step) * config.batch_size / max(now - last_log_time,
                                                                            1e-9)
      m['epoch'] = step * config.batch_size / num_train
      writer.write(step, m)
      last_log_time, last_log_step = now, step
    last = m
    eval_result = None
    if eval_every and (step % eval_every == 0 or step == config.total_steps):
      if train_lib.is_segmentation(config):
        eval_result = segmentation_metrics(evaluate_segmentation(config, graphdef, state, mesh))
      else:
        eval_result = eval_metrics(evaluate(config, graphdef, state, mesh))
      if eval_result:
        writer.write(step, eval_result)
        logging.info('step %d eval: %s', step, {k: round(v, 4) for k, v in eval_result.items()
                                                 if isinstance(v, float)})
        last = {**last, **eval_result}
      last_log_time = time.perf_counter()  # evaluation time is not training throughput
    if step % config.checkpoint_every_steps == 0 or step == config.total_steps:
      # The localizer has no RSNA score: its checkpoints are kept by recency only.
      checkpoint.save(mngr, step, state, train_iter,
                      metrics={checkpoint.BEST_METRIC: eval_result[checkpoint.BEST_METRIC]}
                      if eval_result and checkpoint.BEST_METRIC in eval_result else None)
  # ------------------------------------------------------------------ done
  if bar:
    bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  close = getattr(train_iter, 'close', None)
  if close:
    close()
  jax.effects_barrier()
  return last
