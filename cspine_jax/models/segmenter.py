"""The localizer: a 3D ViT encoder with a light per-voxel segmentation decoder (C1-C7 + background).

  (B, Z, Y, X, C) -> ViT3D.encode -> patch tokens (B, N, W) -> LayerNorm -> Linear(W, P * F)
  -> unshuffle to voxels (B, Z, Y, X, F) -> concat the C input channels of the voxel's
  (2r+1)^3 neighbourhood -> per-voxel MLP (F + C (2r+1)^3 -> hidden -> K) -> (B, Z, Y, X, K)
  logits, K = 8 classes; plus per-token logits (B, N, K) for an auxiliary patch-level loss.

Why this shape (SETR's "naive" decoder plus a voxel skip): XLA's 3D convolutions on CPU run at
~10 GFLOP/s, so a UNETR decoder (several 3^3 convs at full resolution) would cost more than the
encoder. The encoder's tokens say *which* vertebra a patch is (a global question: counting
levels from C1 down needs attention over the whole neck); the voxel's own intensities say
*where* the bone ends inside the patch. The per-voxel MLP combines the two at ~2 kFLOP per
voxel (0.5 GFLOP for 64^3), so boundaries are not blocky at patch size. The neighbourhood
(``context`` r=1: 27 voxels, ~4 kFLOP per voxel) lets the decoder see an edge rather than one
value: a partial-volume voxel at the surface of a vertebra reads like soft tissue on its own.
The token logits are trained on each patch's label histogram (``losses.token_label_loss``):
they give the encoder a direct signal for *which level* from the first step, instead of only
through the decoder.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cspine_jax import constants

NUM_CLASSES = 1 + len(constants.VERTEBRAE)  # 0 background, 1..7 = C1..C7


def unpatchify(tokens: jax.Array, grid, patch) -> jax.Array:
  """(B, gz*gy*gx, pz*py*px*F) -> (B, gz*pz, gy*py, gx*px, F): inverse of patchify's order."""
  b = tokens.shape[0]
  f = tokens.shape[-1] // math.prod(patch)
  x = tokens.reshape((b,) + tuple(grid) + tuple(patch) + (f,))
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape((b,) + tuple(g * p for g, p in zip(grid, patch)) + (f,))


def neighbourhood(x: jax.Array, radius: int) -> jax.Array:
  """(B, Z, Y, X, C) -> (B, Z, Y, X, C (2r+1)^3): each voxel's values and its neighbours'.

  Edge-padded shifted views concatenated on the channel axis (an im2col without the conv:
  XLA's CPU 3D convolutions are ~10x slower per FLOP than this and a matmul).
  """
  if radius <= 0:
    return x
  r = radius
  p = jnp.pad(x, ((0, 0), (r, r), (r, r), (r, r), (0, 0)), mode='edge')
  z, y, w = x.shape[1:4]
  views = [p[:, i:i + z, j:j + y, k:k + w] for i in range(2 * r + 1)
           for j in range(2 * r + 1) for k in range(2 * r + 1)]
  return jnp.concatenate(views, axis=-1)


class Segmenter(nnx.Module):
  """(B, Z, Y, X, C) -> (B, Z, Y, X, num_classes) logits; ``backbone`` is a ViT3D."""

  def __init__(self, backbone: nnx.Module, *, in_channels: int, num_classes: int = NUM_CLASSES,
               decoder_features: int = 16, decoder_hidden: int = 32, context: int = 0,
               rngs: nnx.Rngs):
    self.backbone = backbone
    self.patch = tuple(backbone.patch_size)
    self.num_classes = num_classes
    self.context = int(context)
    width = backbone.width
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.unshuffle = nnx.Linear(width, math.prod(self.patch) * decoder_features, rngs=rngs)
    local = in_channels * (2 * self.context + 1) ** 3
    self.hidden = nnx.Linear(decoder_features + local, decoder_hidden, rngs=rngs)
    # Background prior in the bias: the first steps are not spent learning that most voxels
    # are background (as the classifiers' prior-initialised heads).
    # (A fresh array per layer: two parameters sharing one buffer break donation.)
    def bias(*_):
      return jnp.zeros((num_classes,), jnp.float32).at[0].set(3.0)
    self.out = nnx.Linear(decoder_hidden, num_classes, bias_init=bias, rngs=rngs)
    self.token_out = nnx.Linear(width, num_classes, bias_init=bias, rngs=rngs)

  def outputs(self, x: jax.Array, *, deterministic: bool = True,
              rng: jax.Array | None = None) -> dict[str, jax.Array]:
    h = self.backbone.encode(x, deterministic=deterministic, rng=rng)
    h = self.norm(h[:, self.backbone.num_prefix:].astype(jnp.float32))
    grid = tuple(n // p for n, p in zip(x.shape[1:4], self.patch))
    f = unpatchify(self.unshuffle(h), grid, self.patch)
    f = jnp.concatenate([jax.nn.gelu(f), neighbourhood(x.astype(jnp.float32), self.context)],
                        axis=-1)
    logits = self.out(jax.nn.gelu(self.hidden(f)))
    return {'logits': logits, 'token_logits': self.token_out(h)}

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               rng: jax.Array | None = None) -> jax.Array:
    return self.outputs(x, deterministic=deterministic, rng=rng)['logits']
