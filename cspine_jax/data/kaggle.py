"""The competition's CSV files, read strictly: train.csv's labels (the converter's input and the
metric's solution) and the rows of any of its CSVs, every error naming the file, line and column.

One reader for both users: a label file that the converter accepts is one the metric scores.
"""
from __future__ import annotations

import csv
import math

from cspine_jax import constants


def cell(value) -> str:
  """A CSV cell as shown in an error: short, one line."""
  if value is None:
    return 'missing (the row is short)'
  if not value.strip():
    return 'empty'
  return repr(value if len(value) <= 30 else value[:30] + '...')


def csv_rows(path: str, columns, example: str | None = None) -> list[tuple[int, dict]]:
  """(line number, row) of a CSV whose header has every one of ``columns``; else ValueError."""
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    try:
      found = reader.fieldnames or []
      missing = [c for c in columns if c not in found]
      if missing:
        header = ','.join(found)
        header = header if len(header) <= 80 else header[:80] + '...'
        raise ValueError(f'{path}: missing columns {missing} (header: '
                         f'{header or "none, empty file"}; want {example or ",".join(columns)})')
      return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as e:
      raise ValueError(f'{path}: not UTF-8 text (byte {e.start})') from None
    except csv.Error as e:  # e.g. a NUL byte: not a ValueError, would end in a traceback
      raise ValueError(f'{path}:{reader.line_num}: not CSV ({e})') from None


def read_labels(path: str) -> list[tuple[int, str, list[int]]]:
  """(line, StudyInstanceUID, 8 labels in TARGETS order) of every row of a train.csv-layout file.

  ValueError naming the file, line and column: a missing column, an empty or repeated
  StudyInstanceUID (which row would be the truth?), a label that is not 0 or 1.
  """
  out, lines = [], {}
  for line, row in csv_rows(path, ('StudyInstanceUID',) + constants.TARGETS):
    uid = (row['StudyInstanceUID'] or '').strip()
    if not uid:
      raise ValueError(f'{path}:{line}: empty StudyInstanceUID')
    if uid in lines:
      raise ValueError(f'{path}:{line}: StudyInstanceUID {uid} is already on line {lines[uid]}')
    labels = []
    for t in constants.TARGETS:
      try:
        value = float(row[t])
      except (TypeError, ValueError):
        value = math.nan
      if value not in (0.0, 1.0):
        raise ValueError(f'{path}:{line}: column {t}: {cell(row[t])} is not 0 or 1')
      labels.append(int(value))
    lines[uid] = line
    out.append((line, uid, labels))
  return out
