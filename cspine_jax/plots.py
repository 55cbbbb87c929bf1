"""Small figures drawn with Pillow (no plotting stack needed): ROC curves."""
from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def roc_png(path: str, curves: list[tuple[str, np.ndarray, np.ndarray, float]],
            title: str = 'ROC') -> None:
  """curves: (name, false positive rates, true positive rates, AUC). Writes a PNG at ``path``."""
  size, margin = 520, 60
  img = Image.new('RGB', (size + 200, size), 'white')
  draw = ImageDraw.Draw(img)
  plot = size - 2 * margin

  def xy(fpr, tpr):
    return margin + fpr * plot, size - margin - tpr * plot

  draw.rectangle([margin, margin, margin + plot, margin + plot], outline='black')
  draw.line([xy(0, 0), xy(1, 1)], fill=(200, 200, 200), width=1)
  for t in (0.0, 0.5, 1.0):
    draw.text((xy(t, 0)[0] - 8, size - margin + 6), f'{t:.1f}', fill='black')
    draw.text((margin - 30, xy(0, t)[1] - 6), f'{t:.1f}', fill='black')
  draw.text((margin + plot / 2 - 60, size - margin + 24), 'false positive rate', fill='black')
  draw.text((8, margin - 30), 'true positive rate', fill='black')
  draw.text((margin, 12), title, fill='black')
  for i, (name, fpr, tpr, auc) in enumerate(curves):
    color = COLORS[i % len(COLORS)]
    if len(fpr) > 1:
      draw.line([xy(f, t) for f, t in zip(fpr, tpr)], fill=color, width=2)
    label = f'{name}: AUC {auc:.3f}' if np.isfinite(auc) else f'{name}: one class only'
    draw.text((size + 4, margin + 18 * i), label, fill=color)
  img.save(path)
