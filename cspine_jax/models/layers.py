"""Building blocks of the 3D ViT: patch embedding, position codes, attention, MLP.

Randomness is explicit: every stochastic op takes a `jax.random` key (or None
when `deterministic`), instead of an `nnx.Rngs` stream stored in the module.
The model state is then parameters only, so a train step can be a pure jitted
function of `nnx.split(model)` state plus a key folded with the step number
(big_vision style), and no RNG counters have to be checkpointed.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Transformer linears use Xavier-uniform (as ViT / big_vision); biases zero.
DENSE_INIT = nnx.initializers.xavier_uniform()
ZEROS = nnx.initializers.zeros_init()


def dropout(x: jax.Array, rate: float, key: jax.Array | None,
            deterministic: bool) -> jax.Array:
  """Inverted dropout; identity when deterministic or rate == 0."""
  if deterministic or rate == 0.0:
    return x
  if key is None:
    raise ValueError('dropout with rate > 0 in training mode needs a key')
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x: jax.Array, rate: jax.Array | float, key: jax.Array | None,
              deterministic: bool) -> jax.Array:
  """Stochastic depth: drops a residual branch for whole examples.

  `rate` may be a traced scalar, because under `scan_layers` the per-layer
  rates (linear in depth) arrive as a scanned array, not as Python floats.
  """
  if deterministic:
    return x
  if isinstance(rate, (int, float)) and rate == 0.0:
    return x
  if key is None:
    raise ValueError('drop_path with rate > 0 in training mode needs a key')
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = jax.random.uniform(key, shape) < keep_prob
  return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
  """Splits a key into `num` keys; passes None through (eval mode)."""
  if key is None:
    return [None] * num
  return list(jax.random.split(key, num))


def posemb_sincos_3d(grid: Sequence[int], width: int,
                     temperature: float = 10_000.0) -> jax.Array:
  """Fixed 3D sin-cos position code, (prod(grid), width), float32.

  The 2D code of big_vision (`posemb_sincos_2d`) extended to three axes: each
  axis gets 2 * (width // 6) channels (sin and cos of `width // 6`
  frequencies) of its token index; the `width % 6` leftover channels are zero.
  Token indices, not millimetres, are encoded: with anisotropic patches the
  token grid is what the attention sees.
  """
  per_axis = width // 6
  if per_axis == 0:
    raise ValueError(f'width {width} is too small for a 3D sin-cos code')
  omega = 1.0 / temperature ** (jnp.arange(per_axis, dtype=jnp.float32) /
                                 per_axis)
  axes = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in grid],
                      indexing='ij')
  parts = []
  for pos in axes:
    angle = pos.reshape(-1)[:, None] * omega[None, :]
    parts += [jnp.sin(angle), jnp.cos(angle)]
  code = jnp.concatenate(parts, axis=1)
  return jnp.pad(code, ((0, 0), (0, width - code.shape[1])))


def patchify(x: jax.Array, patch: Sequence[int]) -> jax.Array:
  """(B, Z, Y, X, C) -> (B, nz*ny*nx, pz*py*px*C), tokens in (z, y, x) order.

  The within-patch order (pz, py, px, c) is that of vit_pytorch's vit_3d
  Rearrange('b c (f pf) (h p1) (w p2) -> b (f h w) (pf p1 p2 c)') and of a
  flattened conv kernel (kz, ky, kx, cin), so a Linear on these vectors is
  the kernel = stride = patch convolution.
  """
  b, z, y, x_, c = x.shape
  pz, py, px = patch
  if z % pz or y % py or x_ % px:
    raise ValueError(f'input {x.shape[1:4]} not divisible by patch {patch}')
  x = x.reshape(b, z // pz, pz, y // py, py, x_ // px, px, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (z // pz) * (y // py) * (x_ // px), pz * py * px * c)


class PatchEmbed(nnx.Module):
  """Volumetric patch embedding: kernel = stride = patch, as a matmul.

  `patch_norm=True` reproduces vit_pytorch's layout
  LayerNorm(patch_dim) -> Linear -> LayerNorm(width).
  """

  def __init__(self, patch: Sequence[int], in_channels: int, width: int, *,
               patch_norm: bool, norm_epsilon: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.patch = tuple(patch)
    patch_dim = math.prod(self.patch) * in_channels
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pre_norm = (nnx.LayerNorm(patch_dim, epsilon=norm_epsilon, **kw)
                     if patch_norm else None)
    # LeCun normal on fan-in = patch volume * channels, as a conv would get.
    self.proj = nnx.Linear(patch_dim, width,
                           kernel_init=nnx.initializers.lecun_normal(), **kw)
    self.post_norm = (nnx.LayerNorm(width, epsilon=norm_epsilon, **kw)
                      if patch_norm else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = patchify(x, self.patch)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = self.proj(x)
    if self.post_norm is not None:
      x = self.post_norm(x)
    return x


# config.model.attention_impl: how `attend` computes softmax(q k^T / sqrt(d) + bias) v.
#   'xla'     jax.nn.dot_product_attention's XLA path (logits in float32 from bf16 operands).
#   'cudnn'   its cuDNN flash attention: no (B, H, N, N) logits in memory. Needs a GPU and a
#             bf16/fp16 compute dtype; elsewhere (CPU, TPU, float32) and with a bias (the
#             deformable layers' relative-position bias: cuDNN wants even sequence lengths
#             to train a bias, and 1 + tokens is odd) the XLA path is used instead.
#   'einsum'  two einsums and a float32 softmax, the code before dot_product_attention.
# Attention dropout, when it is active (training with a rate > 0), always takes the einsum
# path: dot_product_attention has no dropout on its attention weights.
ATTENTION_IMPLS = ('xla', 'cudnn', 'einsum')


def attention_path(impl: str, dtype, *, has_bias: bool, dropout_active: bool) -> str:
  """The path `attend` takes for ``impl`` ('xla', 'cudnn' or 'einsum'); see ATTENTION_IMPLS."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}')
  if dropout_active:
    return 'einsum'
  if impl == 'cudnn' and (has_bias or jax.default_backend() != 'gpu' or
                          jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)):
    return 'xla'
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *,
           bias: jax.Array | None = None, dropout_rate: float = 0.0,
           key: jax.Array | None = None,
           deterministic: bool = True, impl: str = 'xla') -> jax.Array:
  """Scaled dot-product attention, (B, Nq, H, D) x (B, Nk, H, D).

  Softmax in float32 whatever the compute dtype (bf16 logits lose the small
  differences that matter after exponentiation). `bias` is added to the
  logits, shape broadcastable to (B, H, Nq, Nk). `impl`: ATTENTION_IMPLS.
  """
  dtype = q.dtype
  path = attention_path(impl, dtype, has_bias=bias is not None,
                        dropout_active=not deterministic and dropout_rate > 0)
  if path != 'einsum':
    if bias is not None:
      bias = bias.astype(jnp.float32)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=path)
  q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  probs = dropout(probs, dropout_rate, key, deterministic)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection.

  The qkv output is laid out (3, heads, head_dim), the order of
  vit_pytorch's `to_qkv(x).chunk(3)` followed by '(h d)' heads.
  """

  def __init__(self, width: int, num_heads: int, head_dim: int, *,
               qkv_bias: bool, attention_dropout: float, dtype, param_dtype,
               rngs: nnx.Rngs, attention_impl: str = 'xla'):
    attention_path(attention_impl, dtype, has_bias=False, dropout_active=False)  # fails early
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.attention_dropout = attention_dropout
    self.attention_impl = attention_impl
    inner = num_heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=DENSE_INIT,
              rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * inner, use_bias=qkv_bias, **kw)
    self.out = nnx.Linear(inner, width, **kw)

  def __call__(self, x: jax.Array, *, key: jax.Array | None,
               deterministic: bool) -> jax.Array:
    b, n, _ = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    out = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                 dropout_rate=self.attention_dropout, key=key,
                 deterministic=deterministic, impl=self.attention_impl)
    return self.out(out.reshape(b, n, -1))


class Mlp(nnx.Module):
  """Linear -> GELU -> dropout -> Linear (the outer dropout is the block's)."""

  def __init__(self, width: int, mlp_dim: int, *, dropout_rate: float,
               gelu_approximate: bool, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=DENSE_INIT,
              rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_dim, **kw)
    self.fc2 = nnx.Linear(mlp_dim, width, **kw)
    self.dropout_rate = dropout_rate
    self.gelu_approximate = gelu_approximate

  def __call__(self, x: jax.Array, *, key: jax.Array | None,
               deterministic: bool) -> jax.Array:
    x = nnx.gelu(self.fc1(x), approximate=self.gelu_approximate)
    x = dropout(x, self.dropout_rate, key, deterministic)
    return self.fc2(x)
