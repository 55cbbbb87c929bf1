"""Trilinear sampling of a channels-last volume at continuous points.

Coordinate convention (used by the deformable attention and its tests):

* Points are given in **voxel index units, ordered (z, y, x)** = (depth,
  height, width) = the array axes 0, 1, 2. Voxel `i` has its centre at the
  integer coordinate `i`; the volume's valid span is [0, n - 1] per axis.
* Outside that span the volume is **zero**, corner by corner: each of the 8
  neighbours that falls outside contributes 0 and the weights are not
  renormalised. That is `jax.scipy.ndimage.map_coordinates(order=1,
  mode='constant', cval=0)` and `torch.nn.functional.grid_sample(...,
  mode='bilinear', padding_mode='zeros')`.
* Relation to `grid_sample` on a 5-D input (N, C, D, H, W): its grid's last
  axis is ordered (x, y, z) = (W, H, D), the reverse of ours, and normalised
  to [-1, 1]. With `align_corners=True`, -1 and +1 are the centres of the
  first and last voxels: g = 2 i / (n - 1) - 1. With `align_corners=False`
  they are the outer edges of those voxels: g = (2 i + 1) / n - 1.
  `to_grid_sample` does that conversion (reversing the axis order).

All 8 corners are gathered in one indexing op on the flattened volume (the
same trick as Scenic's 2D deformable DETR sampler, which packs its 4 corners),
rather than 8 separate gathers.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

# The 8 corner offsets of a unit cube, (8, 3) in (z, y, x) order.
# numpy, not jnp: a module-level jax array would start the XLA backend at import time, before
# jax.distributed.initialize can run.
_CORNERS = np.array(list(itertools.product((0, 1), repeat=3)), np.int32)


def trilinear_sample(volume: jax.Array, coords: jax.Array) -> jax.Array:
  """Samples `volume` (Z, Y, X, C) at `coords` (..., 3) -> (..., C).

  Coordinates are float (z, y, x) voxel indices (see module docstring),
  computed in at least float32; the result has the wider of that and the
  volume's dtype. Differentiable in both
  the volume and the coordinates (piecewise linear in the coordinates; the
  derivative at exact integer coordinates is the one-sided one from above).
  """
  zyx = jnp.array(volume.shape[:3], jnp.int32)
  channels = volume.shape[3]
  # At least float32 (bf16 coordinates are too coarse); float64 stays.
  ctype = jnp.promote_types(coords.dtype, jnp.float32)
  coords = coords.astype(ctype)
  base = jnp.floor(coords)
  frac = coords - base  # (..., 3), in [0, 1)
  idx = base.astype(jnp.int32)[..., None, :] + _CORNERS  # (..., 8, 3)
  # Weight of a corner: product over axes of frac (offset 1) or 1 - frac.
  weights = jnp.where(_CORNERS == 1, frac[..., None, :],
                      1.0 - frac[..., None, :]).prod(axis=-1)  # (..., 8)
  valid = jnp.all((idx >= 0) & (idx < zyx), axis=-1)
  idx = jnp.clip(idx, 0, zyx - 1)
  flat = (idx[..., 0] * zyx[1] + idx[..., 1]) * zyx[2] + idx[..., 2]
  corners = volume.reshape(-1, channels)[flat]  # (..., 8, C): one gather
  weights = jnp.where(valid, weights, 0.0)
  out_dtype = jnp.promote_types(volume.dtype, ctype)
  return jnp.einsum('...k,...kc->...c', weights.astype(out_dtype),
                    corners.astype(out_dtype))


# (B, Z, Y, X, C) volumes with (B, ..., 3) points.
batched_trilinear_sample = jax.vmap(trilinear_sample)


def to_grid_sample(coords: jax.Array, shape: tuple[int, int, int], *,
                   align_corners: bool) -> jax.Array:
  """(z, y, x) voxel coordinates -> grid_sample's normalised (x, y, z)."""
  n = jnp.asarray(shape, jnp.float32)
  if align_corners:
    g = 2.0 * coords / (n - 1.0) - 1.0
  else:
    g = (2.0 * coords + 1.0) / n - 1.0
  return g[..., ::-1]
