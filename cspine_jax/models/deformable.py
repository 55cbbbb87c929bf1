"""Deformable multi-head attention (DAT, Xia et al. CVPR 2022) on a 3D token grid.

What DAT does, and how it maps to the 3D token grid of the ViT:

1. Queries q = Linear(x) for every token.
2. Offsets: the grid queries of each offset group (channels split in G groups,
   the offset network shared by the groups) go through a depthwise 3D conv
   with stride r (the key grid is r times coarser per axis), LayerNorm, GELU
   and a Linear to 3 numbers (dz, dy, dx). With `offset_range_factor` f > 0
   they are bounded by tanh to +-f * r / 2 tokens per axis: DAT's range
   f / (Hk - 1) in grid_sample units, expressed in tokens (f = 2 lets a key
   move by one key cell).
3. Reference points: the centre of each strided conv window, in token units,
   so the offsets are predicted from the neighbourhood they move away from.
   (DAT's 2D code normalises its reference grid by (Hk - 1) while sampling
   with align_corners=True, which puts the last reference points outside the
   map; the centres here are exact.)
4. Keys and values: x (the block's normalised input, not q) sampled
   trilinearly at reference + offset, group g's channels at group g's points,
   zero outside the grid, then Linear projections (as DAT: sample, then
   project).
5. Relative position bias: a learned table over displacements
   (2Z-1, 2Y-1, 2X-1, heads), sampled trilinearly at query position - key
   position (continuous), for each head at its group's points.

Prefix tokens (CLS, distillation) have no grid position: they are queries like
every token, are also keys/values (unsampled, appended before the sampled
keys), and get no position bias. With r = 1 and zero offsets the layer is
exactly full self-attention plus a relative position bias (tested).

All coordinates follow `sampling.py`: (z, y, x) token indices, float32 even
under a bf16 compute dtype (a bf16 coordinate at 30 has a resolution of 1/8
of a token).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import layers
from cspine_jax.models import sampling


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
  if isinstance(v, int):
    return (v, v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 3:
    raise ValueError(f'expected an int or 3 ints, got {v}')
  return v


def conv_geometry(n: int, kernel: int, stride: int):
  """Output size, (pad_lo, pad_hi) and window centres of a 'SAME' strided conv.

  Padding as XLA's SAME: out = ceil(n / stride), total padding
  max((out - 1) * stride + kernel - n, 0), the smaller half first. Window j
  covers input [j * stride - pad_lo, ... + kernel - 1], centred at
  j * stride - pad_lo + (kernel - 1) / 2.
  """
  out = -(-n // stride)
  total = max((out - 1) * stride + kernel - n, 0)
  lo = total // 2
  centres = [j * stride - lo + (kernel - 1) / 2 for j in range(out)]
  return out, (lo, total - lo), centres


def reference_points(grid: Sequence[int], kernel: Sequence[int],
                     stride: Sequence[int]) -> jax.Array:
  """(Nk, 3) float32 (z, y, x) reference points, key cells in raster order."""
  centres = [conv_geometry(n, k, s)[2] for n, k, s in zip(grid, kernel, stride)]
  mesh = jnp.meshgrid(*[jnp.asarray(c, jnp.float32) for c in centres],
                      indexing='ij')
  return jnp.stack([m.reshape(-1) for m in mesh], axis=-1)


def grid_positions(grid: Sequence[int]) -> jax.Array:
  """(Z*Y*X, 3) float32 integer positions of the query tokens."""
  mesh = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in grid],
                      indexing='ij')
  return jnp.stack([m.reshape(-1) for m in mesh], axis=-1)


class DeformableAttention(nnx.Module):
  """DAT attention for (B, prefix + Z*Y*X, C) tokens of a fixed 3D grid."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int], num_prefix: int, offset_groups: int = 1,
               downsample: int | Sequence[int] = 2,
               offset_kernel: int | Sequence[int] = 3,
               offset_range_factor: float = 2.0, use_rpe: bool = True,
               qkv_bias: bool = True, attention_dropout: float = 0.0,
               norm_epsilon: float = 1e-6, gelu_approximate: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
               attention_impl: str = 'xla'):
    inner = num_heads * head_dim
    g = offset_groups
    if width % g or inner % g or num_heads % g:
      raise ValueError(f'offset_groups {g} must divide width {width}, '
                       f'heads*head_dim {inner} and heads {num_heads}')
    self.grid = tuple(int(n) for n in grid)
    self.num_prefix = num_prefix
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.groups = g
    self.stride = _triple(downsample)
    self.kernel = _triple(offset_kernel)
    self.offset_range_factor = float(offset_range_factor)
    self.use_rpe = use_rpe
    self.attention_dropout = attention_dropout
    layers.attention_path(attention_impl, dtype, has_bias=use_rpe, dropout_active=False)
    self.attention_impl = attention_impl
    self.gelu_approximate = gelu_approximate
    self.dtype = dtype
    geo = [conv_geometry(n, k, s)
           for n, k, s in zip(self.grid, self.kernel, self.stride)]
    self.key_grid = tuple(o for o, _, _ in geo)
    padding = [p for _, p, _ in geo]

    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dense = dict(kernel_init=layers.DENSE_INIT, **kw)
    self.q = nnx.Linear(width, inner, use_bias=qkv_bias, **dense)
    self.k = nnx.Linear(width, inner, use_bias=qkv_bias, **dense)
    self.v = nnx.Linear(width, inner, use_bias=qkv_bias, **dense)
    self.out = nnx.Linear(inner, width, **dense)

    cg = inner // g
    self.offset_conv = nnx.Conv(cg, cg, self.kernel, strides=self.stride,
                                padding=padding, feature_group_count=cg, **kw)
    self.offset_norm = nnx.LayerNorm(cg, epsilon=norm_epsilon, **kw)
    # Zero-initialised: training starts from keys on the reference grid (a
    # strided "pooled" attention) and learns to move them.
    self.offset_proj = nnx.Linear(cg, 3, use_bias=False,
                                  kernel_init=nnx.initializers.zeros_init(),
                                  **kw)
    if use_rpe:
      table = tuple(2 * n - 1 for n in self.grid) + (num_heads,)
      # DAT initialises its table with trunc_normal(std=0.01).
      self.rpe_table = nnx.Param(
          nnx.initializers.truncated_normal(0.01)(rngs.params(), table,
                                                  param_dtype))

  @property
  def num_keys(self) -> int:
    return math.prod(self.key_grid)

  def sample_points(self, q_grid: jax.Array) -> jax.Array:
    """Grid queries (B, Z*Y*X, inner) -> (B, G, Nk, 3) float32 key points."""
    b = q_grid.shape[0]
    g = self.groups
    z, y, x = self.grid
    q = q_grid.reshape(b, z, y, x, g, -1).transpose(0, 4, 1, 2, 3, 5)
    q = q.reshape(b * g, z, y, x, -1)
    h = self.offset_conv(q)
    h = nnx.gelu(self.offset_norm(h), approximate=self.gelu_approximate)
    off = self.offset_proj(h).astype(jnp.float32)  # (B*G, Zk, Yk, Xk, 3)
    off = off.reshape(b, g, self.num_keys, 3)
    if self.offset_range_factor > 0:
      bound = jnp.asarray(self.stride, jnp.float32) * (
          self.offset_range_factor / 2.0)
      off = jnp.tanh(off) * bound
    ref = reference_points(self.grid, self.kernel, self.stride)
    return ref + off

  def relative_bias(self, points: jax.Array) -> jax.Array:
    """(B, G, Nk, 3) key points -> (B, heads, Z*Y*X, Nk) logit bias."""
    b, g = points.shape[:2]
    qpos = grid_positions(self.grid)  # (Nq, 3)
    centre = jnp.asarray(self.grid, jnp.float32) - 1.0
    # Table index of displacement d = q - k is d + (n - 1) per axis.
    disp = qpos[None, None, :, None, :] - points[:, :, None] + centre
    table = self.rpe_table[...].reshape(self.rpe_table.shape[:3] + (g, -1))
    table = jnp.moveaxis(table, 3, 0)  # (G, 2Z-1, 2Y-1, 2X-1, heads / G)
    per_group = jax.vmap(sampling.trilinear_sample)  # over groups
    bias = jax.vmap(per_group, in_axes=(None, 0))(table, disp)
    # (B, G, Nq, Nk, heads/G) -> (B, heads, Nq, Nk); head = g * (heads/G) + i.
    bias = bias.transpose(0, 1, 4, 2, 3)
    return bias.reshape(b, self.num_heads, bias.shape[3], bias.shape[4])

  def __call__(self, x: jax.Array, *, key: jax.Array | None,
               deterministic: bool) -> jax.Array:
    b, n, c = x.shape
    p = self.num_prefix
    z, y, x_ = self.grid
    if n != p + z * y * x_:
      raise ValueError(f'{n} tokens do not match prefix {p} + grid '
                       f'{self.grid}')
    g = self.groups
    q = self.q(x)
    points = self.sample_points(q[:, p:])

    # Keys/values: group g's channels of x sampled at group g's points.
    vol = x[:, p:].reshape(b, z, y, x_, g, c // g).transpose(0, 4, 1, 2, 3, 5)
    vol = vol.reshape(b * g, z, y, x_, c // g)
    samples = sampling.batched_trilinear_sample(
        vol, points.reshape(b * g, -1, 3))  # (B*G, Nk, C/G)
    samples = samples.reshape(b, g, -1, c // g).transpose(0, 2, 1, 3)
    kv_in = jnp.concatenate(
        [x[:, :p], samples.reshape(b, -1, c).astype(x.dtype)], axis=1)

    heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, self.head_dim)  # noqa: E731
    bias = None
    if self.use_rpe:
      bias = self.relative_bias(points)
      bias = jnp.pad(bias, ((0, 0), (0, 0), (p, 0), (p, 0)))
    out = layers.attend(heads(q), heads(self.k(kv_in)), heads(self.v(kv_in)),
                        bias=bias, dropout_rate=self.attention_dropout,
                        key=key, deterministic=deterministic,
                        impl=self.attention_impl)
    return self.out(out.reshape(b, n, -1))
