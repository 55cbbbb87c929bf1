"""2.5D CNN + bidirectional GRU: the RSNA 2022 top solutions' vertebra classifier, per crop.

(B, z, y, x, C) -> each axial slice with its neighbours as channels (``context`` slices above and
below, edge-replicated: a 3-slice stack for context 1) -> a small 2D ResNet shared by all slices
-> global average pool -> one feature vector per slice (B, z, F) -> a bidirectional GRU over the
slice sequence (cranial -> caudal and back) -> mean and max over slices, concatenated, LayerNorm
-> features (B, width) -> the ViT's classifier head.

Why this shape (1st/2nd place, RSNA 2022): a fracture line shows in a few consecutive slices; the
2D CNN sees in-plane detail at full resolution (cheaper than a 3D kernel: 9 taps, not 27), the
neighbouring slices as channels give it the local through-plane context, and the GRU decides over
the whole vertebra in both directions. Max pooling over slices keeps a fracture that is visible
in a single slice from being averaged away.

The GRU is a ``lax.scan`` over slices with the input projections of all slices hoisted into one
matmul (the cuDNN layout; only the (B, H) x (H, 3H) recurrent product stays in the loop), rather
than ``nnx.RNN``: the model is called inside a pure jitted step over its ``nnx.split`` state, and
a plain scan over arrays keeps NNX's graph traversal and RNG plumbing out of that step.

Same interface as CNN3D and ViT3D (``outputs`` -> {'features', 'logits'}, ``__call__``,
``width``), so VertebraClassifier wraps it and the training loop takes it unchanged.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax.models import heads
from cspine_jax.models import layers


def slice_stacks(x: jax.Array, context: int) -> jax.Array:
  """(B, z, y, x, C) -> (B, z, y, x, (2 * context + 1) * C): slice i with i-context..i+context.

  Edges repeat the first/last slice (a crop boundary is not a dark slice).
  """
  if context == 0:
    return x
  z = x.shape[1]
  padded = jnp.pad(x, ((0, 0), (context, context), (0, 0), (0, 0), (0, 0)), mode='edge')
  return jnp.concatenate([padded[:, i:i + z] for i in range(2 * context + 1)], axis=-1)


class ResBlock2D(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, dtype, rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(i, o, (k, k), strides=(s, s), padding='SAME',  # noqa
                                       use_bias=False, dtype=dtype, rngs=rngs)
    norm = lambda c: nnx.GroupNorm(c, num_groups=min(8, c), dtype=dtype, rngs=rngs)  # noqa
    self.conv1, self.norm1 = conv(cin, cout, 3, stride), norm(cout)
    self.conv2, self.norm2 = conv(cout, cout, 3, 1), norm(cout)
    self.proj = conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
    self.proj_norm = norm(cout) if self.proj is not None else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.norm1(self.conv1(x)))
    h = self.norm2(self.conv2(h))
    skip = x if self.proj is None else self.proj_norm(self.proj(x))
    return jax.nn.relu(h + skip)


class GRU(nnx.Module):
  """One-direction GRU over axis 1 of (B, T, F) -> (B, T, H); flax's GRUCell equations.

  r = s(Wir x + Whr h + b_r), u = s(Wiu x + Whu h + b_u), n = tanh(Win x + b_in + r (Whn h + b_hn)),
  h' = (1 - u) n + u h.
  """

  def __init__(self, in_features: int, hidden: int, *, reverse: bool, rngs: nnx.Rngs):
    self.hidden = hidden
    self.reverse = reverse
    self.inp = nnx.Linear(in_features, 3 * hidden, rngs=rngs)  # biases b_r, b_u, b_in
    self.rec = nnx.Linear(hidden, 3 * hidden, kernel_init=nnx.initializers.orthogonal(),
                          use_bias=False, rngs=rngs)
    self.rec_bias_n = nnx.Param(jnp.zeros((hidden,), jnp.float32))  # b_hn, inside r * (...)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, _ = x.shape
    h_dim = self.hidden
    xs = self.inp(x.astype(jnp.float32))  # (B, T, 3H): all input projections in one matmul
    w_rec = self.rec.kernel[...]
    b_n = self.rec_bias_n[...]

    def step(h, xt):
      hr = h @ w_rec
      r = jax.nn.sigmoid(xt[:, :h_dim] + hr[:, :h_dim])
      u = jax.nn.sigmoid(xt[:, h_dim:2 * h_dim] + hr[:, h_dim:2 * h_dim])
      n = jnp.tanh(xt[:, 2 * h_dim:] + r * (hr[:, 2 * h_dim:] + b_n))
      h = (1.0 - u) * n + u * h
      return h, h

    h0 = jnp.zeros((b, h_dim), jnp.float32)
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(xs, 0, 1), reverse=self.reverse)
    return jnp.swapaxes(hs, 0, 1)  # scan(reverse=True) returns outputs in input order


class CNN25D(nnx.Module):
  """2.5D CNN over slice stacks + bidirectional GRU over slices, with the ViT's heads."""

  def __init__(self, *, input_shape: Sequence[int], in_channels: int = 1, context: int = 1,
               widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 1, 1),
               stem_stride: int = 1, rnn_hidden: int = 64, dropout: float = 0.0,
               patient_head: str = 'logit', head_bias_init: str = 'prior',
               dtype: str = 'float32', rngs: nnx.Rngs, **unused):
    del unused  # keys of the shared config skeleton that only the ViT reads
    self.input_shape = tuple(int(n) for n in input_shape)
    self.context = int(context)
    self.dtype = jnp.dtype(dtype)
    self.dropout = float(dropout)
    self.max_rate = self.dropout
    cin = (2 * self.context + 1) * in_channels
    self.stem = nnx.Conv(cin, widths[0], (3, 3), strides=(stem_stride,) * 2, padding='SAME',
                         use_bias=False, dtype=self.dtype, rngs=rngs)
    self.stem_norm = nnx.GroupNorm(widths[0], num_groups=min(8, widths[0]), dtype=self.dtype,
                                   rngs=rngs)
    blocks_list = []
    c = widths[0]
    for i, (w, n) in enumerate(zip(widths, blocks)):
      for j in range(n):
        blocks_list.append(ResBlock2D(c, w, 2 if (i > 0 and j == 0) else 1, self.dtype, rngs))
        c = w
    self.blocks = nnx.List(blocks_list) if hasattr(nnx, 'List') else blocks_list
    self.slice_norm = nnx.LayerNorm(c, dtype=jnp.float32, rngs=rngs)
    self.forward_rnn = GRU(c, rnn_hidden, reverse=False, rngs=rngs)
    self.backward_rnn = GRU(c, rnn_hidden, reverse=True, rngs=rngs)
    self.width = 4 * rnn_hidden  # (mean, max) x (forward, backward)
    self.final_norm = nnx.LayerNorm(self.width, dtype=jnp.float32, rngs=rngs)
    self.head = heads.ClassifierHead(self.width, patient_head=patient_head,
                                     bias_init=head_bias_init, rngs=rngs)

  def sequence(self, x: jax.Array) -> jax.Array:
    """(B, z, y, x, C) -> (B, z, 2H): the bidirectional GRU's per-slice outputs."""
    if x.ndim != 5:
      raise ValueError(f'expected (batch, z, y, x, channels), got {x.shape}')
    b, z = x.shape[:2]
    stacks = slice_stacks(x.astype(self.dtype), self.context)
    h = stacks.reshape((b * z,) + stacks.shape[2:])  # every slice through the same 2D CNN
    h = jax.nn.relu(self.stem_norm(self.stem(h)))
    for block in self.blocks:
      h = block(h)
    per_slice = h.astype(jnp.float32).mean(axis=(1, 2)).reshape(b, z, -1)
    per_slice = self.slice_norm(per_slice)
    return jnp.concatenate([self.forward_rnn(per_slice), self.backward_rnn(per_slice)], axis=-1)

  def outputs(self, x: jax.Array, *, deterministic: bool = True,
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    seq = self.sequence(x)
    pooled = jnp.concatenate([seq.mean(axis=1), seq.max(axis=1)], axis=-1)
    pooled = layers.dropout(pooled, self.dropout, rng, deterministic)
    features = self.final_norm(pooled)
    return {'features': features, 'logits': self.head(features)}

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> jax.Array:
    return self.outputs(x, deterministic=deterministic, rng=rng)['logits']
