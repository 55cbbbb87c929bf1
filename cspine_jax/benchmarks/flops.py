"""FLOPs of a training step (XLA's count and a closed form), matmul peak, MFU.

XLA's `compiled.cost_analysis()["flops"]` counts every HLO op (matmuls as
2*M*N*K, plus normalisations, softmax, the optimizer update), but it counts
the body of a `while` loop once, not once per iteration: a `jax.lax.scan`
over 12 layers reports the flops of one layer, so counts are taken on a
copy of the model with `scan_layers=False` (tests/test_flops.py checks the
closed form against XLA's count of a whole train step that way).

The closed form (`analytic_*`) counts matmul flops only (2 per
multiply-add): forward, and backward = 2x forward (gradients with respect to
both operands) except the gradient of the input image, which no one needs
(XLA removes it too). It agrees with XLA to a few percent for the shapes of
this project (tests/test_flops.py states the tolerance); the difference is
the elementwise work.

MFU = model flops per step / step time / peak. `measure_matmul_peak`
measures the peak as the best rate of large jitted matmuls through XLA, the
attainable ceiling for this code (DESIGN.md section 5: ~110 GFLOP/s f32 on
the 2-core CI machine, below numpy/OpenBLAS's ~145).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cspine_jax.models import deformable
from cspine_jax.models import factory
from cspine_jax.models import heads
from cspine_jax.models import vit3d


def _cfg(model_config) -> dict[str, Any]:
  cfg = (model_config.to_dict() if hasattr(model_config, 'to_dict')
         else dict(model_config))
  if cfg.get('name', 'vit3d') != 'vit3d':
    raise NotImplementedError(f'closed forms are for vit3d, not {cfg["name"]}')
  return cfg


def _defaults(fn) -> dict[str, Any]:
  return {k: v.default for k, v in inspect.signature(fn).parameters.items()
          if v.default is not v.empty}


class _Shape:
  """The sizes the closed forms need, with ViT3D's defaults."""

  def __init__(self, model_config):
    c = _cfg(model_config)
    sig = _defaults(vit3d.ViT3D.__init__)
    get = lambda k: c.get(k, sig.get(k))  # noqa: E731
    # model.mode="vertebra": 7 crops per example through the same trunk
    # (cspine_jax/models/vertebra.py); the task table says how many.
    self.mode = c.get('mode', 'region')
    self.crops = factory.TASKS[self.mode].crops
    self.input_shape = tuple(c['input_shape'])
    self.patch = tuple(get('patch_size'))
    self.grid = tuple(n // p for n, p in zip(self.input_shape, self.patch))
    self.n = math.prod(self.grid)
    self.patch_dim = math.prod(self.patch) * get('in_channels')
    self.d = get('width')
    self.depth = get('depth')
    self.h = get('num_heads')
    self.i = self.h * (get('head_dim') or self.d // self.h)
    self.m = get('mlp_dim')
    self.prefix = 2 if get('distill_token') else 1
    self.t = self.n + self.prefix
    self.heads = 2 if get('distill_token') else 1
    self.k = heads.num_head_outputs(get('patient_head'))
    self.learned = get('pos_embedding') == 'learned'
    self.patch_norm = get('patch_embed_norm')
    self.qkv_bias = get('qkv_bias')
    self.kinds = vit3d.layer_kinds(self.depth, get('attention'),
                                   get('deformable_layers'))
    d = dict(get('deformable') or {})
    dsig = _defaults(deformable.DeformableAttention.__init__)
    dget = lambda k: d.get(k, dsig.get(k))  # noqa: E731
    self.groups = dget('offset_groups')
    self.kernel = deformable._triple(dget('offset_kernel'))  # pylint: disable=protected-access
    stride = deformable._triple(dget('downsample'))  # pylint: disable=protected-access
    self.nk = math.prod(deformable.conv_geometry(n, k, s)[0] for n, k, s in
                        zip(self.grid, self.kernel, stride))
    self.use_rpe = dget('use_rpe')


def analytic_param_count(model_config) -> int:
  """Closed-form number of parameters of `ViT3D(**model_config)`."""
  s = _Shape(model_config)
  if s.mode != 'region':
    raise NotImplementedError('closed-form parameters: region mode only')
  d, i, m = s.d, s.i, s.m
  total = s.patch_dim * d + d
  if s.patch_norm:
    total += 2 * s.patch_dim + 2 * d
  total += s.n * d if s.learned else 0
  total += s.prefix * d  # CLS (+ DIST)
  mlp = d * m + m + m * d + d
  bias = i if s.qkv_bias else 0
  for kind in s.kinds:
    total += 4 * d + mlp + i * d + d  # two LayerNorms, MLP, out projection
    if kind == 'full':
      total += 3 * (d * i + bias)
    else:
      cg = i // s.groups
      total += 3 * (d * i + bias)  # q, k, v
      total += math.prod(s.kernel) * cg + cg + 2 * cg + 3 * cg  # offsets
      if s.use_rpe:
        total += math.prod(2 * n - 1 for n in s.grid) * s.h
  total += 2 * d  # final norm
  total += s.heads * (d * s.k + s.k)
  return total


def analytic_forward_flops(model_config, batch_size: int) -> dict[str, float]:
  """Matmul flops (2 per multiply-add) of one forward pass, by part.

  Deformable layers add their sampling as 2 flops per weighted corner
  (8 corners); it is gather work, not matmul work, on real hardware. With
  `mode="vertebra"` each example is 7 crops through the trunk (the
  per-vertebra head is counted like the ViT head, a negligible difference).
  """
  s = _Shape(model_config)
  b, t, d, i, m = batch_size * s.crops, s.t, s.d, s.i, s.m
  parts = {'patch_embed': 2.0 * b * s.n * s.patch_dim * d,
           'attention': 0.0, 'mlp': 0.0, 'deformable_sampling': 0.0}
  for kind in s.kinds:
    parts['mlp'] += 2.0 * b * t * d * m * 2
    if kind == 'full':
      nkv = t
      parts['attention'] += 2.0 * b * t * d * 3 * i
    else:
      nkv = s.prefix + s.nk
      cg = i // s.groups
      parts['attention'] += 2.0 * b * (t * d * i + 2 * nkv * d * i)
      parts['attention'] += 2.0 * b * s.groups * s.nk * cg * (
          math.prod(s.kernel) + 3)
      sampling = 2.0 * 8 * b * s.nk * d
      if s.use_rpe:
        sampling += 2.0 * 8 * b * s.n * s.nk * s.h
      parts['deformable_sampling'] += sampling
    parts['attention'] += 2.0 * b * t * nkv * i * 2  # scores and weights @ v
    parts['attention'] += 2.0 * b * t * i * d  # output projection
  parts['head'] = 2.0 * b * d * s.k * s.heads
  parts['total'] = sum(parts.values())
  return parts


def analytic_train_flops(model_config, batch_size: int) -> float:
  """Forward + backward matmul flops of one step (no input-image gradient)."""
  f = analytic_forward_flops(model_config, batch_size)
  # Backward = 2x forward, minus d(loss)/d(image) of the patch embedding.
  return 3.0 * f['total'] - f['patch_embed']


def xla_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
  """XLA's flop count of `jax.jit(fn)(*args)`; args may be ShapeDtypeStructs.

  Loops count once per loop body (see the module docstring).
  """
  compiled = jax.jit(fn, **kwargs).lower(*args).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float(cost['flops'])


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, chain: int = 4,
                        repeats: int = 5) -> float:
  """Best attained FLOP/s of `chain` (n x n) @ (n x n) matmuls in one jit.

  Best of `repeats` timed calls after a warm-up (compilation excluded).
  Results feed MFU; on the 2-core CI machine f32 is ~1e11.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

  @jax.jit
  def f(a, b):
    for _ in range(chain):  # unrolled: each product depends on the last
      a = a @ b
    return a

  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 * chain / best


def mfu(step_flops: float, step_seconds: float, peak_flops_per_s: float
        ) -> float:
  """Model flops utilisation: achieved flops rate / peak."""
  return step_flops / step_seconds / peak_flops_per_s


def param_count(model: nnx.Module) -> int:
  """Number of parameters (nnx.Param leaves) of a model (abstract or not)."""
  return int(sum(np.prod(p.shape) for p in
                 jax.tree.leaves(nnx.state(model, nnx.Param))))

