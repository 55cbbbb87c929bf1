"""Classifier head: features -> 8 logits in TARGETS order (patient, C1..C7).

The patient-level logit can be its own output ("logit") or derived from the 7
vertebra logits, because in the data patient_overall is the OR of C1..C7:

* "noisy_or": P(patient) = 1 - prod_i (1 - p_i), the probability that at
  least one vertebra is fractured if the vertebrae were independent.
* "max": P(patient) = max_i p_i, a lower bound of the OR; its logit is the
  max of the vertebra logits since the sigmoid is monotone.

The derived variants are returned as logits too, so the losses and metrics
never need to know which one a model uses. The combinations are pure
functions so that a per-vertebra model (one logit per crop) can reuse them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cspine_jax import constants

PATIENT_HEADS = ('logit', 'noisy_or', 'max')
NUM_VERTEBRAE = len(constants.VERTEBRAE)

# Below this |log(1 - p)| the noisy-OR uses a series (see noisy_or_logit).
_SMALL = 1e-3
# log(softplus(v)) is evaluated as v below this (softplus(v) = e^v (1 + O(e^v))).
_LOG_SOFTPLUS_LINEAR = -15.0


def _log_softplus(v: jax.Array) -> jax.Array:
  """log(log(1 + e^v)), finite (and with finite gradients) for any v."""
  linear = v < _LOG_SOFTPLUS_LINEAR
  safe = jnp.where(linear, 0.0, v)  # keep log(0) out of the unused branch
  return jnp.where(linear, v, jnp.log(jax.nn.softplus(safe)))


def noisy_or_logit(vertebra_logits: jax.Array) -> jax.Array:
  """logit(1 - prod(1 - sigmoid(v))) over the last axis, computed stably.

  With s = log(1 - P) = sum_i log_sigmoid(-v_i) <= 0 the logit is
  log(P) - s, and log(P) = log(1 - e^s). Far from P = 0 that is
  log(-expm1(s)). Near P = 0 (t = -s < 1e-3) it is log(t) + log(1 - t/2 + ...)
  with log(t) = logsumexp_i(log softplus(v_i)): no cancellation and no
  underflow even when every v_i is -100 (where t itself is a float32
  denormal), and the result tends to logsumexp(v) as it should.
  """
  v = vertebra_logits.astype(jnp.float32)
  s = jnp.sum(jax.nn.log_sigmoid(-v), axis=-1)
  t = -s
  small = t < _SMALL
  # Large-P branch; the where keeps expm1(0) = 0 (log -> -inf) out of grads.
  s_big = jnp.where(small, -1.0, s)
  log_p_big = jnp.log(-jnp.expm1(s_big))
  log_t = jax.scipy.special.logsumexp(_log_softplus(v), axis=-1)
  log_p_small = log_t - 0.5 * t + t * t / 24.0
  log_p = jnp.where(small, log_p_small, log_p_big)
  return log_p - s


def max_logit(vertebra_logits: jax.Array) -> jax.Array:
  """logit(max_i sigmoid(v_i)) = max_i v_i."""
  return jnp.max(vertebra_logits, axis=-1)


def combine_patient(outputs: jax.Array, patient_head: str) -> jax.Array:
  """Head outputs -> (..., 8) logits in TARGETS order.

  `outputs` has 8 entries (patient first) for "logit" and 7 (C1..C7) for
  the derived variants.
  """
  if patient_head == 'logit':
    return outputs
  if patient_head == 'noisy_or':
    patient = noisy_or_logit(outputs)
  elif patient_head == 'max':
    patient = max_logit(outputs)
  else:
    raise ValueError(f'patient_head {patient_head!r} not in {PATIENT_HEADS}')
  return jnp.concatenate([patient[..., None].astype(outputs.dtype), outputs],
                         axis=-1)


def num_head_outputs(patient_head: str) -> int:
  if patient_head not in PATIENT_HEADS:
    raise ValueError(f'patient_head {patient_head!r} not in {PATIENT_HEADS}')
  return constants.NUM_TARGETS if patient_head == 'logit' else NUM_VERTEBRAE


def prior_bias(patient_head: str) -> np.ndarray:
  """Initial head bias = log-odds of the training positive rates.

  Starting at the base rates removes the first phase of training in which a
  zero-initialised head only learns the label frequencies (and the early
  loss spikes of an imbalanced multi-label BCE).
  """
  rates = np.asarray(constants.POSITIVE_RATES, np.float64)
  if patient_head != 'logit':
    rates = rates[1:]
  return np.log(rates / (1.0 - rates)).astype(np.float32)


class ClassifierHead(nnx.Module):
  """Linear(width -> 8 or 7) then the patient combination, float32 out.

  The head runs in float32 whatever the trunk's compute dtype: it is tiny,
  and the logits feed a log loss.
  """

  def __init__(self, width: int, *, patient_head: str = 'logit',
               zero_init: bool = True, bias_init: str = 'prior',
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.patient_head = patient_head
    n = num_head_outputs(patient_head)
    if bias_init == 'prior':
      bias = prior_bias(patient_head)
      b_init = lambda *_: jnp.asarray(bias, param_dtype)  # noqa: E731
    elif bias_init == 'zeros':
      b_init = nnx.initializers.zeros_init()
    else:
      raise ValueError(f'head bias_init {bias_init!r} not in (prior, zeros)')
    # Zero kernel (big_vision's head_zeroinit): the initial logits are the
    # prior whatever the features.
    k_init = (nnx.initializers.zeros_init() if zero_init else
              nnx.initializers.normal(1.0 / math.sqrt(width)))
    self.dense = nnx.Linear(width, n, dtype=jnp.float32,
                            param_dtype=param_dtype, kernel_init=k_init,
                            bias_init=b_init, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    return combine_patient(self.dense(features.astype(jnp.float32)),
                           self.patient_head)
