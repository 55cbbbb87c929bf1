"""The prediction overlay: sagittal and coronal slices through the spine with coloured vertebrae.

Pillow only (a declared dependency; no matplotlib). Slices are taken through the centre of the
predicted C1-C7 mask, shown in the bone window, resampled to square millimetres so anatomy has
its real proportions, superior at the top. Each vertebra is tinted in its colour and labelled
with its name and fracture probability at the right of the view. The title carries the patient
probability, or NOT ASSESSABLE when there is none, and notes under it (e.g. the vertebrae the
localizer did not find); the same text is in the PNG's `Description` text chunk, for a reader
(and a test) that cannot look at pixels.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from cspine_jax import constants

# One distinct colour per level (C1..C7), readable on a grey CT.
COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
          (145, 30, 180), (70, 240, 240))
WINDOW = (400.0, 1800.0)  # bone window (center, width)
PANEL_HEIGHT = 360  # pixels


def _gray(hu: np.ndarray) -> np.ndarray:
  c, w = WINDOW
  return (np.clip((hu.astype(np.float32) - (c - w / 2)) / w, 0, 1) * 255).astype(np.uint8)


def _panel(hu2d: np.ndarray, lab2d: np.ndarray, mm_per_px: tuple[float, float],
           probs: dict, title: str) -> Image.Image:
  """One view: (rows = z, cols) HU and labels -> an RGB panel with labels at the right."""
  rgb = np.repeat(_gray(hu2d)[..., None], 3, axis=-1).astype(np.float32)
  for i, color in enumerate(COLORS):
    m = lab2d == i + 1
    rgb[m] = 0.55 * rgb[m] + 0.45 * np.asarray(color, np.float32)
  img = Image.fromarray(rgb.astype(np.uint8))
  rows_mm = hu2d.shape[0] * mm_per_px[0]
  cols_mm = hu2d.shape[1] * mm_per_px[1]
  scale = PANEL_HEIGHT / max(rows_mm, 1e-6)
  size = (max(1, int(round(cols_mm * scale))), PANEL_HEIGHT)
  img = img.resize(size, Image.NEAREST)
  legend = 120
  out = Image.new('RGB', (size[0] + legend, size[1] + 20), (0, 0, 0))
  out.paste(img, (0, 20))
  draw = ImageDraw.Draw(out)
  draw.text((4, 4), title, fill=(255, 255, 255))
  for i, name in enumerate(constants.VERTEBRAE):
    rows = np.nonzero((lab2d == i + 1).any(axis=1))[0]
    if rows.size == 0:
      continue
    y = 20 + int(round((rows.mean() + 0.5) * mm_per_px[0] * scale))
    draw.line([(size[0] - 6, y), (size[0] + 4, y)], fill=COLORS[i], width=2)
    p = probs.get(name)
    # 'C1 0.05' reads as 'C10.05' in the small bitmap font: a colon and p= keep them apart.
    text = f'{name}: p={p:.2f}' if p is not None else name
    draw.text((size[0] + 8, y - 6), text, fill=COLORS[i])
  return out


def title_lines(patient_probability: float | None, notes=()) -> list[str]:
  """The overlay's title and notes, one string per line."""
  if patient_probability is None:
    head = 'NOT ASSESSABLE: no fracture probability for this study'
  else:
    head = f'patient fracture probability {patient_probability:.2f}'
  return [head, *notes]


def render(hu: np.ndarray, mask: np.ndarray, spacing_mm, probs: dict,
           patient_probability: float | None, notes=()) -> bytes:
  """PNG bytes: sagittal (left) and coronal (right) through the centre of the mask.

  hu, mask: (z, y, x) on the same grid (z = 0 superior; y, x the DICOM rows and columns).
  Without any predicted vertebra the views go through the volume's centre. probs: name ->
  probability, None for a vertebra not assessed; patient_probability None: the study is not
  assessable (the title says so). notes: lines printed under the title.
  """
  dz, dy, dx = (float(v) for v in spacing_mm)
  # The centre from a strided sample of the mask: exact enough for a slice position and ~30x
  # cheaper than scanning all of a 512^2 x 300 mask.
  step = 4
  sub = mask[::step, ::step, ::step]
  idx = np.argwhere(sub > 0)
  if len(idx):
    cz, cy, cx = (idx.mean(0) * step).round().astype(int)
  else:
    cz, cy, cx = (np.asarray(mask.shape) // 2)
  cy = int(np.clip(cy, 0, mask.shape[1] - 1))
  cx = int(np.clip(cx, 0, mask.shape[2] - 1))
  sag = _panel(hu[:, :, cx], mask[:, :, cx], (dz, dy), probs, f'sagittal (x={cx})')
  cor = _panel(hu[:, cy, :], mask[:, cy, :], (dz, dx), probs, f'coronal (y={cy})')
  lines = title_lines(patient_probability, notes)
  line_px = 14
  header = 14 + line_px * len(lines)
  width = sag.width + cor.width + 10
  canvas = Image.new('RGB', (width, max(sag.height, cor.height) + header), (0, 0, 0))
  canvas.paste(sag, (0, header))
  canvas.paste(cor, (sag.width + 10, header))
  draw = ImageDraw.Draw(canvas)
  for i, line in enumerate(lines):
    # The verdict in white; a missing answer (not assessable, levels not found) in amber.
    plain = i == 0 and patient_probability is not None
    draw.text((6, 8 + line_px * i), line, fill=(255, 255, 255) if plain else (255, 176, 0))
  info = PngImagePlugin.PngInfo()
  info.add_text('Description', '\n'.join(lines))
  buf = io.BytesIO()
  canvas.save(buf, format='PNG', pnginfo=info)
  return buf.getvalue()
