"""Orbax checkpoints holding the train state and the Grain iterator together.

`W/checkpoints/<step>/` has two items: `state` (parameters, optimizer state, step, RNG, EMA) and
`data` (each process's input-iterator state). Saves are asynchronous and atomic (Orbax writes a
temporary folder and renames it when complete, so a `kill -9` mid-save leaves the previous
checkpoints intact). Kept: the latest `keep_latest` plus the `keep_best` with the lowest eval RSNA
score (`preservation_policy`, not the deprecated `max_to_keep`).
"""
from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = 'eval_rsna_score'


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
      enable_async_checkpointing=not read_only,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None,
         metrics: dict | None = None) -> None:
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def abstract(state):
  """ShapeDtypeStructs (with shardings) of a state, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore(mngr: ocp.CheckpointManager, step: int, state_like, data_iterator=None):
  """Restores `state` (laid out like ``state_like``) and, if given, the iterator in place."""
  items = {'state': ocp.args.StandardRestore(abstract(state_like))}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored['state']


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the lowest eval RSNA score (None if none was evaluated)."""
  scored = []
  for step in mngr.all_steps():
    path = os.path.join(str(mngr.directory), str(step), 'metrics', 'metrics')
    try:
      with open(path) as f:
        scored.append((json.load(f)[BEST_METRIC], step))
    except (OSError, KeyError, ValueError):
      continue
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
