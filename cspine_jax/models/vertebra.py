"""Per-vertebra classification: one crop per vertebra C1..C7 through a shared backbone.

Input (B, 7, z, y, x, C): the seven crops of a study (data.crop_mode = 'vertebrae'). Each crop goes
through the same backbone (any model with ``outputs(x)['features']`` and ``width``: the 3D ViT
here), a learned embedding of the vertebra level is added to its feature vector, and a shared
linear layer gives that vertebra's fracture logit. patient_overall is derived from the seven
('noisy_or' or 'max', cspine_jax.models.heads) or learned from the pooled features ('logit').
This is how the top RSNA 2022 solutions classified: locate, crop per vertebra, then combine.
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

  def outputs(self, x: jax.Array, *, deterministic: bool = True,
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    if x.ndim != 6 or x.shape[1] != NUM_LEVELS:
      raise ValueError(f'expected (batch, 7, z, y, x, channels), got {x.shape}')
    b = x.shape[0]
    flat = x.reshape((b * NUM_LEVELS,) + x.shape[2:])
    f = self.backbone.outputs(flat, deterministic=deterministic, rng=rng)['features']
    f = f.astype(jnp.float32).reshape(b, NUM_LEVELS, -1) + self.level_embed[...][None]
    vertebra_logits = self.vertebra_head(f)[..., 0] + self.level_bias[...][None]  # (B, 7)
    if self.patient_head == 'logit':
      patient = self.patient(f.mean(axis=1))  # (B, 1)
      logits = jnp.concatenate([patient, vertebra_logits], axis=-1)
    else:
      logits = heads.combine_patient(vertebra_logits, self.patient_head)
    return {'features': f, 'logits': logits}

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> jax.Array:
    return self.outputs(x, deterministic=deterministic, rng=rng)['logits']
