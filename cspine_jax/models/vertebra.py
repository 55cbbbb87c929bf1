"""Per-vertebra classification: one crop per vertebra C1..C7 through a shared backbone.

Input (B, 7, z, y, x, C): the seven crops of a study (data.crop_mode = 'vertebrae'). Each crop goes
through the same backbone (any model with ``outputs(x)['features']`` and ``width``: the 3D ViT
here), a learned embedding of the vertebra level is added to its feature vector, and a shared
linear layer gives that vertebra's fracture logit. patient_overall is derived from the seven
('noisy_or' or 'max', cspine_jax.models.heads) or learned from the pooled features ('logit').
This is how the top RSNA 2022 solutions classified: locate, crop per vertebra, then combine.

With a DeiT distillation token in the backbone (``backbone.distill_token``), the DIST features get
their own vertebra head, level bias (and patient head): 'logits_cls' and 'logits_dist' are the
8 logits from each token, for the two terms of the distillation loss, and 'logits' is their mean
(DeiT's inference rule). The level embedding is shared: it says which vertebra, not which token.
The backbone's per-crop maps for feature distillation (a CNN's 'feature_map', a ViT's 'hint')
pass through as (B, 7, z, y, x, C).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cspine_jax import constants
from cspine_jax.models import heads

NUM_LEVELS = len(constants.VERTEBRAE)


def _logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p / (1 - p)).astype(np.float32)


class VertebraClassifier(nnx.Module):
  """(B, 7, z, y, x, C) -> (B, 8) logits in TARGETS order."""

  def __init__(self, backbone: nnx.Module, *, patient_head: str = 'noisy_or',
               rngs: nnx.Rngs):
    if patient_head not in ('logit', 'noisy_or', 'max'):
      raise ValueError(f'patient_head {patient_head!r} not in (logit, noisy_or, max)')
    self.backbone = backbone
    self.patient_head = patient_head
    width = backbone.width
    self.width = width
    self.level_embed = nnx.Param(jnp.zeros((NUM_LEVELS, width), jnp.float32))
    # Zero kernel, prior bias: each vertebra starts at its training prevalence.
    rates = constants.POSITIVE_RATES
    self.vertebra_head = nnx.Linear(width, 1, kernel_init=nnx.initializers.zeros_init(),
                                    rngs=rngs)
    self.level_bias = nnx.Param(jnp.asarray(_logit(rates[1:])))
    if patient_head == 'logit':
      self.patient = nnx.Linear(width, 1, kernel_init=nnx.initializers.zeros_init(),
                                bias_init=lambda *_: jnp.asarray(_logit(rates[:1])), rngs=rngs)
    self.distill_token = bool(getattr(backbone, 'distill_token', False))
    if self.distill_token:
      self.vertebra_head_dist = nnx.Linear(width, 1, kernel_init=nnx.initializers.zeros_init(),
                                           rngs=rngs)
      self.level_bias_dist = nnx.Param(jnp.asarray(_logit(rates[1:])))
      if patient_head == 'logit':
        self.patient_dist = nnx.Linear(
            width, 1, kernel_init=nnx.initializers.zeros_init(),
            bias_init=lambda *_: jnp.asarray(_logit(rates[:1])), rngs=rngs)

  def _combine(self, f: jax.Array, head: nnx.Module, level_bias: jax.Array,
               patient: nnx.Module | None) -> jax.Array:
    """(B, 7, width) level-embedded features -> (B, 8) logits in TARGETS order."""
    vertebra_logits = head(f)[..., 0] + level_bias[None]  # (B, 7)
    if self.patient_head == 'logit':
      return jnp.concatenate([patient(f.mean(axis=1)), vertebra_logits], axis=-1)
    return heads.combine_patient(vertebra_logits, self.patient_head)

  def outputs(self, x: jax.Array, *, deterministic: bool = True,
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    if x.ndim != 6 or x.shape[1] != NUM_LEVELS:
      raise ValueError(f'expected (batch, 7, z, y, x, channels), got {x.shape}')
    b = x.shape[0]
    flat = x.reshape((b * NUM_LEVELS,) + x.shape[2:])
    out = self.backbone.outputs(flat, deterministic=deterministic, rng=rng)
    embed = lambda v: (v.astype(jnp.float32).reshape(b, NUM_LEVELS, -1)  # noqa: E731
                       + self.level_embed[...][None])
    f = embed(out['features'])
    logits = self._combine(f, self.vertebra_head, self.level_bias[...],
                           getattr(self, 'patient', None))
    # Per-crop maps of feature distillation (a CNN teacher's feature_map, a ViT student's hint).
    maps = {k: out[k].reshape((b, NUM_LEVELS) + out[k].shape[1:])
            for k in ('feature_map', 'hint') if k in out}
    if not self.distill_token:
      return {'features': f, 'logits': logits, **maps}
    f_dist = embed(out['features_dist'])
    logits_dist = self._combine(f_dist, self.vertebra_head_dist, self.level_bias_dist[...],
                                getattr(self, 'patient_dist', None))
    return {'features': f, 'features_dist': f_dist, 'logits_cls': logits,
            'logits_dist': logits_dist, 'logits': 0.5 * (logits + logits_dist), **maps}

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> jax.Array:
    return self.outputs(x, deterministic=deterministic, rng=rng)['logits']
