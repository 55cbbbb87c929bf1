"""Training losses on (batch, 8) logits in TARGETS order (patient, C1..C7).

* "bce": mean binary cross-entropy over examples and the 8 targets (the seed).
* "rsna_weighted": the RSNA 2022 metric as a loss: per example
  sum_t w_t * bce_t / sum_t w_t with w = 7, 1, ..., 1 where the label is
  negative and 14, 2, ..., 2 where positive (constants.py), then the mean over
  examples. It is computed from logits (log-sigmoid), so no clipping is
  needed; the competition metric's clipping of probabilities belongs to
  metrics, not to the loss.
* Distillation (DeiT, with sigmoids instead of a softmax):
  (1 - alpha) * task(logits_cls, labels) + alpha * task(logits_dist, targets)
  where targets are the teacher's decisions (hard: 1[teacher logit > 0], i.e.
  sigmoid > 0.5) or its temperature-softened probabilities (soft:
  sigmoid(teacher / T), student logits divided by T, the term scaled by T^2
  so that its gradient keeps its size as T changes, Hinton et al. 2015).
  The soft term is a cross-entropy, which differs from the KL divergence by
  the teacher's entropy, a constant for the student.

* Feature distillation (FitNets' hints, Romero et al. 2015; for a ViT taught by a CNN, as
  in DearKD / ViTKD): the student's patch tokens, mapped linearly to the teacher's channels
  ("hint"), regress the teacher's last feature map, position by position. The two grids are
  brought to the coarser one by average pooling; the teacher's vector at each position is
  standardised over channels (its scale is the teacher's business). A dense target:
  positions x channels numbers per crop where the logit terms give eight.

`mask` arguments (batch,) weight examples (0 for padding) and the mean is
over the examples with weight > 0.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cspine_jax import constants

LOSSES = ('bce', 'rsna_weighted')
DISTILL_KINDS = ('hard', 'soft')


def sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise -[y log sigmoid(z) + (1 - y) log sigmoid(-z)], float32.

  Targets may be soft (in [0, 1]).
  """
  z = logits.astype(jnp.float32)
  y = targets.astype(jnp.float32)
  return -(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))


def _masked_mean(per_example: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return per_example.mean()
  m = mask.astype(jnp.float32)
  return (per_example * m).sum() / jnp.maximum(m.sum(), 1.0)


def smooth_labels(labels: jax.Array, eps: float) -> jax.Array:
  """Binary label smoothing: 0 -> eps/2, 1 -> 1 - eps/2 (``config.label_smoothing``).

  Why: a per-vertebra CNN fits a few dozen studies to logits of +-10; on held-out studies the
  RSNA log loss then punishes its few confident misses far more than its ranking earns. Demo
  data: RSNA 0.82 at mean AUC 0.95 without (14 held-out studies, one stage); 0.216 at mean AUC
  0.97 with eps = 0.1 (24 held-out studies, two stages); README "Model comparison".
  """
  return labels * (1.0 - eps) + 0.5 * eps


def rsna_weights(labels: jax.Array) -> jax.Array:
  """(..., 8) per-target weights of the RSNA metric (soft labels interpolate)."""
  y = labels.astype(jnp.float32)
  neg = jnp.asarray(constants.NEGATIVE_WEIGHTS, jnp.float32)
  pos = jnp.asarray(constants.POSITIVE_WEIGHTS, jnp.float32)
  return neg + y * (pos - neg)


def bce_loss(logits: jax.Array, targets: jax.Array,
             mask: jax.Array | None = None, *,
             weight_labels: jax.Array | None = None) -> jax.Array:
  """Mean BCE over examples and targets. (`weight_labels` is unused.)"""
  del weight_labels
  return _masked_mean(sigmoid_bce(logits, targets).mean(axis=-1), mask)


def rsna_weighted_bce(logits: jax.Array, targets: jax.Array,
                      mask: jax.Array | None = None, *,
                      weight_labels: jax.Array | None = None) -> jax.Array:
  """Per-example RSNA-weighted BCE, averaged over examples.

  The weights follow `weight_labels` (default: `targets`). Distillation
  passes the true labels there, so that the weights stay the metric's even
  when the targets are the teacher's.
  """
  w = rsna_weights(targets if weight_labels is None else weight_labels)
  per_example = (w * sigmoid_bce(logits, targets)).sum(-1) / w.sum(-1)
  return _masked_mean(per_example, mask)


def get_loss(name: str) -> Callable[..., jax.Array]:
  """'bce' | 'rsna_weighted' -> loss(logits, targets, mask=None)."""
  if name == 'bce':
    return bce_loss
  if name == 'rsna_weighted':
    return rsna_weighted_bce
  raise ValueError(f'loss {name!r} not in {LOSSES}')


def distill_targets(teacher_logits: jax.Array, kind: str,
                    temperature: float = 1.0) -> jax.Array:
  """Teacher logits -> targets for the distillation head (no gradient)."""
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  if kind == 'hard':
    return (t > 0).astype(jnp.float32)
  if kind == 'soft':
    return jax.nn.sigmoid(t / temperature)
  raise ValueError(f'distill kind {kind!r} not in {DISTILL_KINDS}')


def distillation_loss(logits_cls: jax.Array, logits_dist: jax.Array,
                      labels: jax.Array, teacher_logits: jax.Array, *,
                      alpha: float, kind: str, temperature: float = 1.0,
                      loss: str = 'bce',
                      mask: jax.Array | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DeiT loss: (1 - alpha) * task(cls head) + alpha * distill(dist head).

  Both terms use the same task loss (`loss`), the distillation term against
  the teacher's targets (with the RSNA weights, if any, taken from the true
  labels). Hard targets ignore `temperature`. Returns (loss, parts) with
  parts = {"task": ..., "distill": ...} for logging.
  """
  fn = get_loss(loss)
  task = fn(logits_cls, labels, mask)
  targets = distill_targets(teacher_logits, kind, temperature)
  if kind == 'soft':
    distill = temperature ** 2 * fn(logits_dist / temperature, targets, mask,
                                    weight_labels=labels)
  else:
    distill = fn(logits_dist, targets, mask, weight_labels=labels)
  total = (1.0 - alpha) * task + alpha * distill
  return total, {'task': task, 'distill': distill}


def _pool_to(x: jax.Array, grid: tuple[int, ...]) -> jax.Array:
  """(N, z, y, x, C) average-pooled to ``grid`` (each axis an integer multiple of it)."""
  n, c = x.shape[0], x.shape[-1]
  src = x.shape[1:4]
  if any(s % g for s, g in zip(src, grid)):
    raise ValueError(f'feature distillation: grid {src} is not a multiple of {grid}')
  f = [s // g for s, g in zip(src, grid)]
  x = x.reshape((n, grid[0], f[0], grid[1], f[1], grid[2], f[2], c))
  return x.mean(axis=(2, 4, 6))


def feature_distillation_loss(hint: jax.Array, teacher_map: jax.Array,
                              mask: jax.Array | None = None) -> jax.Array:
  """Mean squared error between the student's hint and the teacher's standardised map.

  hint (..., gz, gy, gx, C) and teacher_map (..., tz, ty, tx, C) with the same leading axes
  (batch, or batch x vertebrae) and channels; the finer grid is average-pooled to the coarser.
  ``mask`` has the leading axes' shape (or a prefix of it: per example). Returns a scalar.
  """
  lead = hint.shape[:-4]
  if teacher_map.shape[:-4] != lead or teacher_map.shape[-1] != hint.shape[-1]:
    raise ValueError(f'feature distillation: student hint {hint.shape} and teacher map '
                     f'{teacher_map.shape} differ in their leading axes or channels '
                     '(config.model.hint_dim must be the teacher\'s last width)')
  s = hint.astype(jnp.float32).reshape((-1,) + hint.shape[-4:])
  t = jax.lax.stop_gradient(teacher_map.astype(jnp.float32)).reshape(
      (-1,) + teacher_map.shape[-4:])
  grid = tuple(min(a, b) for a, b in zip(s.shape[1:4], t.shape[1:4]))
  s, t = _pool_to(s, grid), _pool_to(t, grid)
  t = (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True) + 1e-5)
  per = ((s - t) ** 2).mean(axis=(1, 2, 3, 4)).reshape(lead)
  if mask is not None:  # per example or per crop: broadcast over the trailing leading axes
    mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (per.ndim - mask.ndim)), per.shape)
  return _masked_mean(per, mask)


def segmentation_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
                      dice_weight: float = 1.0, smooth: float = 1.0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The localizer's loss: softmax cross-entropy over the K classes + soft Dice (1 - mean Dice).

  logits (B, Z, Y, X, K), labels (B, Z, Y, X) ints in [0, K). Cross-entropy is the voxel mean
  (it learns "bone vs air" fast); the soft Dice is per example and per foreground class
  (classes 1..K-1, i.e. C1..C7), which weighs a small vertebra as much as a large one and as
  much as the (huge) background, so the rare boundary voxels matter. ``smooth`` keeps a class
  that is absent in both prediction and truth at Dice 1. Examples with mask 0 (padding, no
  mask) do not count. Returns (loss, {"ce", "dice"}).
  """
  z = logits.astype(jnp.float32)
  k = z.shape[-1]
  onehot = jax.nn.one_hot(labels.astype(jnp.int32), k, dtype=jnp.float32)
  ce = -(onehot * jax.nn.log_softmax(z)).sum(-1)  # (B, Z, Y, X)
  ce = ce.reshape(ce.shape[0], -1).mean(-1)
  p = jax.nn.softmax(z).reshape(z.shape[0], -1, k)[..., 1:]
  y = onehot.reshape(z.shape[0], -1, k)[..., 1:]
  dice = (2.0 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)  # (B, K-1)
  dice_loss = 1.0 - dice.mean(-1)
  ce, dice_loss = _masked_mean(ce, mask), _masked_mean(dice_loss, mask)
  return ce + dice_weight * dice_loss, {'ce': ce, 'dice': 1.0 - dice_loss}


def token_label_loss(token_logits: jax.Array, labels: jax.Array, patch, mask=None) -> jax.Array:
  """Auxiliary localizer loss: each patch token predicts its patch's label histogram.

  token_logits (B, N, K) in patchify order (z, y, x major to minor), labels (B, Z, Y, X).
  The target is the fraction of the patch's voxels in each class (soft cross-entropy), so a
  token on the disc between C4 and C5 learns "half C4, half C5": the encoder is told which
  level it sees directly, not only through the per-voxel decoder. Masked mean over examples.
  """
  b, k = token_logits.shape[0], token_logits.shape[-1]
  grid = [n // p for n, p in zip(labels.shape[1:4], patch)]
  onehot = jax.nn.one_hot(labels.astype(jnp.int32), k, dtype=jnp.float32)
  h = onehot.reshape(b, grid[0], patch[0], grid[1], patch[1], grid[2], patch[2], k)
  h = h.mean(axis=(2, 4, 6)).reshape(b, -1, k)
  ce = -(h * jax.nn.log_softmax(token_logits.astype(jnp.float32))).sum(-1).mean(-1)
  return _masked_mean(ce, mask)
