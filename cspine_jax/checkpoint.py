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
(`preservation_policy`, not the deprecated `max_to_keep`). This is the only module that calls Orbax.
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = 'eval_rsna_score'
MODEL_KEYS = ('params', 'rest', 'ema')
TRAIN_KEYS = ('step', 'opt_state', 'rng')
LEGACY_ITEM = 'state'  # the single TrainState item of workdirs written before the split


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


def restore_model(mngr: ocp.CheckpointManager, step: int, model_like: dict) -> dict:
  """Restores only {"params", "rest", "ema"} (laid out like ``model_like``): no optimizer state
  is read or needs a target. A legacy `state` item is read partially, the same keys only."""
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
