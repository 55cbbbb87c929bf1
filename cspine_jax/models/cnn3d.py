"""A ResNet-style 3D CNN: the convolutional baseline beside the ViT, and a distillation teacher.

(B, z, y, x, C) -> stem conv -> stages of residual blocks (stride 2 between stages) -> global
average pool -> features (B, width) -> the same classifier head as the ViT (8 logits, patient
combination configurable). Same interface as ViT3D (`outputs`, `__call__`, `width`), so the
per-vertebra wrapper and the training loop take either.

Normalisation: 'group' (GroupNorm: no state, batch-size independent, the default for the small
batches of 3D training) or 'batch' (BatchNorm: running statistics live in the non-parameter model
state, which the train step carries and checkpoints; eval uses the running averages).

Convolution kernel: 'xla' (lax.conv) or 'im2col' (the 27 shifted views concatenated on the channel
axis, then one matmul). XLA's CPU 3D convolutions run at ~10 GFLOP/s against ~110 for its matmuls;
im2col trades memory (27x the activations of each conv input) for the matmul path and was ~1.6x
faster for a whole train step of configs/cnn_vertebra.py on 2 CPU cores. Both use the same
parameters (nnx.Conv kernels) and the same SAME padding, so a checkpoint runs under either.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import heads
from cspine_jax.models import layers


def _norm(kind: str, channels: int, dtype, rngs: nnx.Rngs) -> nnx.Module:
  if kind == 'group':
    return nnx.GroupNorm(channels, num_groups=min(8, channels), dtype=dtype, rngs=rngs)
  if kind == 'batch':
    return nnx.BatchNorm(channels, momentum=0.9, dtype=dtype, rngs=rngs)
  raise ValueError(f'norm {kind!r} not in (group, batch)')


CONV_IMPLS = ('xla', 'im2col')


def im2col_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """``conv(x)`` (3D, SAME padding, any stride) as shifted views + one matmul."""
  kernel = conv.kernel[...]
  k = kernel.shape[:3]
  s = conv.strides if isinstance(conv.strides, (tuple, list)) else (conv.strides,) * 3
  n = x.shape[1:4]
  out = [-(-ni // si) for ni, si in zip(n, s)]
  # XLA's SAME: total padding (out - 1) * s + k - n, the odd voxel after (at the high end).
  total = [max((o - 1) * si + ki - ni, 0) for o, si, ki, ni in zip(out, s, k, n)]
  pads = [(t // 2, t - t // 2) for t in total]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  views = [xp[:, a:a + s[0] * (out[0] - 1) + 1:s[0], b:b + s[1] * (out[1] - 1) + 1:s[1],
              c:c + s[2] * (out[2] - 1) + 1:s[2]]
           for a in range(k[0]) for b in range(k[1]) for c in range(k[2])]
  cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  y = cols @ kernel.reshape(-1, kernel.shape[-1]).astype(cols.dtype)
  if conv.bias is not None:
    y = y + conv.bias[...].astype(y.dtype)
  return y


def _conv(conv: nnx.Conv, x: jax.Array, impl: str) -> jax.Array:
  return im2col_conv(conv, x) if impl == 'im2col' else conv(x)


def _apply_norm(norm: nnx.Module, x: jax.Array, deterministic: bool) -> jax.Array:
  if isinstance(norm, nnx.BatchNorm):
    return norm(x, use_running_average=deterministic)
  return norm(x)


class ResBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, norm: str, dtype, rngs: nnx.Rngs,
               conv_impl: str = 'xla'):
    self.conv_impl = conv_impl
    conv = lambda i, o, k, s: nnx.Conv(i, o, (k,) * 3, strides=(s,) * 3, padding='SAME',  # noqa
                                       use_bias=False, dtype=dtype, rngs=rngs)
    self.conv1 = conv(cin, cout, 3, stride)
    self.norm1 = _norm(norm, cout, dtype, rngs)
    self.conv2 = conv(cout, cout, 3, 1)
    self.norm2 = _norm(norm, cout, dtype, rngs)
    self.proj = conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
    self.proj_norm = _norm(norm, cout, dtype, rngs) if self.proj is not None else None

  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    c = lambda conv, v: _conv(conv, v, self.conv_impl)  # noqa: E731
    h = jax.nn.relu(_apply_norm(self.norm1, c(self.conv1, x), deterministic))
    h = _apply_norm(self.norm2, c(self.conv2, h), deterministic)
    skip = x if self.proj is None else _apply_norm(self.proj_norm, c(self.proj, x), deterministic)
    return jax.nn.relu(h + skip)


class CNN3D(nnx.Module):
  """3D ResNet classifier with the ViT's heads."""

  def __init__(self, *, input_shape: Sequence[int], in_channels: int = 1,
               widths: Sequence[int] = (16, 32, 64, 128), blocks: Sequence[int] = (1, 1, 1, 1),
               stem_stride: int = 1, norm: str = 'group', dropout: float = 0.0,
               patient_head: str = 'logit', head_bias_init: str = 'prior',
               dtype: str = 'float32', conv_impl: str = 'xla', rngs: nnx.Rngs, **unused):
    del unused  # keys of the shared config skeleton that only the ViT reads
    if conv_impl not in CONV_IMPLS:
      raise ValueError(f'conv_impl {conv_impl!r} not in {CONV_IMPLS}')
    self.conv_impl = conv_impl
    self.input_shape = tuple(int(n) for n in input_shape)
    self.dtype = jnp.dtype(dtype)
    self.dropout = float(dropout)
    self.max_rate = self.dropout
    self.stem = nnx.Conv(in_channels, widths[0], (3, 3, 3), strides=(stem_stride,) * 3,
                         padding='SAME', use_bias=False, dtype=self.dtype, rngs=rngs)
    self.stem_norm = _norm(norm, widths[0], self.dtype, rngs)
    blocks_list = []
    cin = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks_list.append(ResBlock(cin, w, stride, norm, self.dtype, rngs, conv_impl))
        cin = w
    self.blocks = nnx.List(blocks_list) if hasattr(nnx, 'List') else blocks_list
    self.width = cin
    self.final_norm = nnx.LayerNorm(cin, dtype=jnp.float32, rngs=rngs)
    self.head = heads.ClassifierHead(cin, patient_head=patient_head, bias_init=head_bias_init,
                                     rngs=rngs)

  def outputs(self, x: jax.Array, *, deterministic: bool = True,
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    if x.ndim != 5:
      raise ValueError(f'expected (batch, z, y, x, channels), got {x.shape}')
    h = _conv(self.stem, x.astype(self.dtype), self.conv_impl)
    h = jax.nn.relu(_apply_norm(self.stem_norm, h, deterministic))
    for block in self.blocks:
      h = block(h, deterministic)
    pooled = h.astype(jnp.float32).mean(axis=(1, 2, 3))
    pooled = layers.dropout(pooled, self.dropout, rng, deterministic)
    features = self.final_norm(pooled)
    # feature_map: the last stage before pooling, the target of feature distillation.
    return {'features': features, 'logits': self.head(features),
            'feature_map': h.astype(jnp.float32)}

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> jax.Array:
    return self.outputs(x, deterministic=deterministic, rng=rng)['logits']
