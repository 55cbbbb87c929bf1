"""Orbax checkpoints: the model, the rest of the train state and the Grain iterator, saved together.

`W/checkpoints/<step>/` holds three items (flax's gemma example keeps the model apart from the
optimizer for the same reason: inference restores the model alone, without building an optimizer):
  model  {"params", "rest", "ema"}: what inference needs (weights, batch-norm statistics, EMA)
  train  {"step", "opt_state", "rng"}: what only resuming training needs
  data   each process's input-iterator state
Workdirs written before this layout have one item, `state` (the whole TrainState); both restore
paths read them too (`LEGACY_ITEM`). Saves are asynchronous and atomic (Orbax writes a temporary
folder and renames it when complete, so a `kill -9` mid-save leaves the previous checkpoints
intact). Kept: the latest `keep_latest` plus the `keep_best` with the lowest eval RSNA score
(`preservation_policy`, not the deprecated `max_to_keep`; the metrics are written beside each
step, so the ranking survives a restart). A step that fails to restore when resuming is moved to
W/checkpoints-damaged/ and the previous one is used (`restore_latest_intact`). This is the only
module that calls Orbax.
"""
from __future__ import annotations

import logging
import os
import sys

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cspine_jax import cli

BEST_METRIC = 'eval_rsna_score'
MODEL_KEYS = ('params', 'rest', 'ema')
TRAIN_KEYS = ('step', 'opt_state', 'rng')
LEGACY_ITEM = 'state'  # the single TrainState item of workdirs written before the split


class _ExpectedOrbaxWarnings(logging.Filter):
  """Drops Orbax warnings about what this module does on purpose, so that the console's
  warnings are ones to read."""

  EXPECTED = (
      # Steps between evaluations, and every localizer checkpoint, have no metrics by design
      # (BestN ranks only the evaluated ones).
      'did not provide metrics',
      # Inference opens the manager read-only ...
      'read_only=True, setting save_interval_steps=0', 'Given directory is read only',
      # ... and restores some items only (the model without the optimizer, no iterator).
      'was found in the checkpoint, but could not be restored',
  )

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in self.EXPECTED)


logging.getLogger('absl').addFilter(_ExpectedOrbaxWarnings())


def steps_on_disk(workdir: str) -> list[int]:
  """The committed steps under W/checkpoints, without opening a manager (which logs)."""
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def manager(workdir: str, config=None, *, read_only: bool = False) -> ocp.CheckpointManager:
  keep_latest = int(config.get('keep_latest_checkpoints', 2)) if config else 2
  keep_best = int(config.get('keep_best_checkpoints', 1)) if config else 1
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=keep_latest),
          # reverse=True sorts descending, and BestN keeps the tail: the lowest losses.
          policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=keep_best,
                         keep_checkpoints_without_metrics=False),
      ]),
      # Without a best_fn Orbax writes no metrics to disk, and BestN (and `best_step`) then has
      # nothing to read after a restart.
      best_fn=lambda m: m[BEST_METRIC], best_mode='min',
      enable_async_checkpointing=not read_only,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None,
         metrics: dict | None = None) -> None:
  """Saves a TrainState as its `model` and `train` items (and the iterator as `data`)."""
  items = {'model': ocp.args.StandardSave({k: getattr(state, k) for k in MODEL_KEYS}),
           'train': ocp.args.StandardSave({k: getattr(state, k) for k in TRAIN_KEYS})}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _is_legacy(mngr: ocp.CheckpointManager, step: int) -> bool:
  return LEGACY_ITEM in mngr.item_metadata(step).keys()


def restore(mngr: ocp.CheckpointManager, step: int, state_like, data_iterator=None):
  """Restores the whole TrainState (laid out like ``state_like``: arrays or ShapeDtypeStructs
  with shardings) and, if given, the iterator in place."""
  items = {}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  if _is_legacy(mngr, step):
    items[LEGACY_ITEM] = ocp.args.StandardRestore(abstract(state_like))
    return mngr.restore(step, args=ocp.args.Composite(**items))[LEGACY_ITEM]
  for name, keys in (('model', MODEL_KEYS), ('train', TRAIN_KEYS)):
    items[name] = ocp.args.StandardRestore(abstract({k: getattr(state_like, k) for k in keys}))
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return state_like.replace(**restored['model'], **restored['train'])


DAMAGED = 'checkpoints-damaged'  # W/checkpoints-damaged/<step>: steps that failed to restore


def _reason(e: BaseException) -> str:
  """The first line of a restore error (Orbax/TensorStore errors run to a hundred lines)."""
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:300] if text else ""}'


def _silence_closed_loop_callbacks() -> None:
  """After a failed restore, the TensorStore reads still in flight complete into the event loop
  that Orbax has closed, and each prints a 'RuntimeError: Event loop is closed' traceback
  through sys.unraisablehook (dozens, after the one warning that matters). Only those are
  dropped; any other unraisable exception reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, 'cspine_closed_loop', False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc):
      return
    previous(unraisable)

  hook.cspine_closed_loop = True
  sys.unraisablehook = hook


def restore_latest_intact(mngr: ocp.CheckpointManager, workdir: str, config, state_like,
                          data_iterator=None):
  """(manager, step, state) of the newest step that restores whole, for resuming training.

  A damaged step (a truncated array file or iterator state, a missing item: a disk that filled
  up, a copy cut short) is moved to W/checkpoints-damaged/<step> with a warning naming it and
  why, and the previous step is tried; nothing is deleted. The manager is reopened after a
  move. If no step restores, a `cli.Failure` lists each step's reason and moves nothing: then
  the cause is more likely the code or the config than the files.
  """
  failed = []
  _silence_closed_loop_callbacks()
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = restore(mngr, step, state_like, data_iterator)
    except Exception as e:  # noqa: BLE001  any failure of this step's files
      failed.append((step, _reason(e)))
      continue
    if failed:
      mngr.close()
      dest = os.path.join(workdir, DAMAGED)
      for bad, why in failed:
        if jax.process_index() == 0:
          os.makedirs(dest, exist_ok=True)
          os.replace(os.path.join(mngr.directory, str(bad)), os.path.join(dest, str(bad)))
          cli.warn(f'checkpoint step {bad} in {workdir} is damaged ({why}); moved to '
                   f'{os.path.join(dest, str(bad))}; resuming from step {step}')
      multihost_utils.sync_global_devices('checkpoint: damaged steps moved')
      mngr = manager(workdir, config)
    return mngr, step, state
  raise cli.Failure(f'no checkpoint in {mngr.directory} restores: ' + '; '.join(
      f'step {s}: {why}' for s, why in failed))


def restore_model(mngr: ocp.CheckpointManager, step: int, model_like: dict) -> dict:
  """Restores only {"params", "rest", "ema"} (laid out like ``model_like``): no optimizer state
  is read or needs a target. A legacy `state` item is read partially, the same keys only.

  A step whose files do not restore is a `cli.Failure` naming the step, the first line of the
  reason and the other kept steps (inference never falls back silently: the user picks one)."""
  _silence_closed_loop_callbacks()
  try:
    return _restore_model(mngr, step, model_like)
  except Exception as e:  # noqa: BLE001  any failure of this step's files
    others = [s for s in mngr.all_steps() if s != step]
    raise cli.Failure(f'checkpoint step {step} in {mngr.directory} does not restore '
                      f'({_reason(e)}); other kept steps: {sorted(others) or "none"} '
                      '(--checkpoint=STEP)') from e


def _restore_model(mngr: ocp.CheckpointManager, step: int, model_like: dict) -> dict:
  target = abstract(model_like)
  if _is_legacy(mngr, step):
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return dict(mngr.restore(step, args=ocp.args.Composite(**{LEGACY_ITEM: args}))[LEGACY_ITEM])
  return dict(mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(target)))['model'])


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the lowest eval RSNA score (None if none was evaluated)."""
  scored = []
  for step in mngr.all_steps():
    metrics = mngr.metrics(step) or {}
    if BEST_METRIC in metrics:
      scored.append((float(metrics[BEST_METRIC]), step))
  return min(scored)[1] if scored else None


def resolve_step(mngr: ocp.CheckpointManager, which: str) -> int:
  """'latest' | 'best' | a step number -> a step that exists, or a clear error."""
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {mngr.directory}')
  if which == 'latest':
    return mngr.latest_step()
  if which == 'best':
    step = best_step(mngr)
    if step is None:
      raise ValueError(f'--checkpoint=best: no checkpoint in {mngr.directory} has eval metrics; '
                       f'kept steps are {sorted(steps)}')
    return step
  try:
    step = int(which)
  except ValueError:
    raise ValueError(f'--checkpoint={which!r}: expected latest, best or a step number') from None
  if step not in steps:
    raise ValueError(f'--checkpoint={step}: not kept; kept steps are {sorted(steps)}')
  return step
