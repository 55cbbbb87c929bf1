"""Evaluation loops and their metrics, for any model function: training's periodic eval and eval.py.

A loop takes a function of a global batch of images (already jitted by its caller, once: the
training loop builds it before its first step, `restore.InferenceModel` once per model), runs
every study of a split exactly once (the last batch padded, `mask` marks real rows) and returns
host numpy arrays. Every process runs every batch, so collectives stay in step on many hosts.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from cspine_jax import device_crop
from cspine_jax import metrics as metrics_lib
from cspine_jax import parallel
from cspine_jax import seg_metrics
from cspine_jax.data import pipeline

ImagesFn = Callable[[jax.Array], jax.Array]


def _close(it) -> None:
  close = getattr(it, 'close', None)
  if close:
    close()


def evaluate(config, predict: ImagesFn, mesh, split: str = 'eval', uids=None,
             studies=None) -> dict:
  """``predict``: images -> (B, 8) probabilities. Every study of ``split`` once (or of
  ``uids``, or exactly the `manifest.Study` records ``studies``); returns {uids, probs, labels,
  labelled} on the host."""
  it, count = pipeline.make_eval_iterator(config, split, uids=uids, studies=studies)
  images = device_crop.images_fn(config)
  out = {'uids': [], 'probs': [], 'labels': [], 'labelled': []}
  sharding = parallel.batch_sharding(mesh)
  try:
    for batch in it:
      g = pipeline.to_global(batch, sharding)
      probs = parallel.host_value(predict(images(g)))
      mask = parallel.host_value(g['mask']).astype(bool)
      labels = parallel.host_value(g['labels'])
      labelled = parallel.host_value(g['labelled']).astype(bool) if 'labelled' in g else mask
      out['probs'].append(probs[mask])
      out['labels'].append(labels[mask])
      out['labelled'].append(labelled[mask])
      out['uids'].extend(_global_uids(batch['uid'], mask))
  finally:
    _close(it)
  result = {k: (np.concatenate(v) if k != 'uids' else v) for k, v in out.items()}
  if len(result['probs']) != count:
    raise RuntimeError(f'evaluation saw {len(result["probs"])} studies, expected {count}')
  return result


def evaluate_segmentation(config, segment: ImagesFn, mesh, split: str = 'eval',
                          uids=None) -> dict:
  """``segment``: images -> (B, z, y, x) labels. Segments every study of ``split`` that has a
  true mask; returns {uids, dice (n, 7)}.

  Dice is computed at the localizer's resolution: the argmax labels against the true mask
  resampled (nearest) onto the same grid, i.e. exactly what the model was trained to output.
  """
  it, _ = pipeline.make_eval_iterator(config, split, uids=uids)
  images = device_crop.images_fn(config)
  sharding = parallel.batch_sharding(mesh)
  out_uids, dice = [], []
  try:
    for batch in it:
      g = pipeline.to_global(batch, sharding)
      pred = parallel.host_value(segment(images(g)))
      true = parallel.host_value(g['segmentation'])
      keep = parallel.host_value(g['mask']).astype(bool) & parallel.host_value(
          g['has_segmentation']).astype(bool)
      for u, p, t, k in zip(_global_uids(batch['uid'], np.ones(len(pred), bool)), pred, true,
                            keep):
        if k:
          out_uids.append(u)
          dice.append(seg_metrics.dice_per_class(p, t))
  finally:
    _close(it)
  return {'uids': out_uids, 'dice': np.asarray(dice).reshape(-1, 7)}


def eval_metrics(result: dict) -> dict:
  """eval_* metrics (RSNA score, AUCs, ...) of `evaluate`'s labelled studies."""
  keep = result['labelled']
  if not keep.any():
    return {}
  rep = metrics_lib.report(result['labels'][keep], result['probs'][keep])
  return {f'eval_{k}': v for k, v in rep.items()}


def segmentation_metrics(result: dict) -> dict:
  """eval_dice_* of `evaluate_segmentation`."""
  if not len(result['dice']):
    return {}
  return {f'eval_{k}': v for k, v in seg_metrics.summarize(result['dice']).items()}


def task_metrics(config, task, fn: ImagesFn, mesh, split: str = 'eval', uids=None) -> dict:
  """The eval_* metrics of one task (``factory.Task``): Dice for the localizer, else RSNA."""
  if task.segmentation:
    return segmentation_metrics(evaluate_segmentation(config, fn, mesh, split, uids))
  return eval_metrics(evaluate(config, fn, mesh, split, uids))


def _global_uids(local_uids, global_mask) -> list[str]:
  """UIDs of the global batch rows (process-local strings gathered across processes)."""
  local = [str(u) for u in np.asarray(local_uids)]
  if jax.process_count() > 1:
    width = 64
    codes = np.zeros((len(local), width), np.uint8)
    for i, u in enumerate(local):
      b = u.encode()[:width]
      codes[i, :len(b)] = np.frombuffer(b, np.uint8)
    allc = np.asarray(multihost_utils.process_allgather(codes, tiled=True))
    local = [bytes(r).rstrip(b'\0').decode() for r in allc]
  return [u for u, m in zip(local, global_mask) if m]
