"""Reading ``manifest.jsonl`` (DESIGN.md section 1) and splitting studies into folds.

Folds are a function of the set of (uid, labels) only, never of the manifest's line order, so
every process and every rerun agrees on them without communicating.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Sequence

from absl import logging
import numpy as np

from cspine_jax import constants
from cspine_jax.data import store

Box = tuple[int, int, int, int, int, int]  # z0, y0, x0, z1, y1, x1 (voxels, end-exclusive)


@dataclasses.dataclass(frozen=True)
class Study:
  """One converted study: geometry, labels and boxes (no voxels)."""
  uid: str
  split: str
  shape: tuple[int, int, int]
  spacing_mm: tuple[float, float, float]
  origin: tuple[float, float, float]
  direction: tuple[tuple[float, ...], ...]  # rows: LPS unit vectors of the z, y, x axes
  has_segmentation: bool
  labels: tuple[int, ...] | None  # constants.TARGETS order, None when unknown
  vertebra_boxes: dict[str, Box]
  predicted_vertebra_boxes: dict[str, Box]
  warnings: tuple[str, ...] = ()
  # Derived levels written beside the volume and mask (store.LEVELS kinds; cspine_jax/data/
  # levels.py); () for a dataset converted before they existed: crops then read the volume.
  levels: tuple[str, ...] = ()

  @property
  def boxes(self) -> dict[str, Box]:
    """Vertebra boxes to crop from: true ones where a segmentation exists, else predicted."""
    return self.vertebra_boxes or self.predicted_vertebra_boxes

  @property
  def segmentation_kind(self) -> str | None:
    """Folder of the mask to crop: the true one, else the localizer's (which exists when it
    wrote predicted boxes), else None."""
    if self.has_segmentation:
      return store.SEGMENTATIONS
    return store.PREDICTED_SEGMENTATIONS if self.predicted_vertebra_boxes else None

  @property
  def box_source(self) -> str:
    if self.vertebra_boxes:
      return 'true'
    return 'predicted' if self.predicted_vertebra_boxes else 'none'


_REQUIRED = object()


def _boxes(d) -> dict[str, Box]:
  return {k: tuple(int(v) for v in b) for k, b in (d or {}).items() if k in constants.VERTEBRAE}


def _floats(v) -> tuple[float, ...]:
  return tuple(float(x) for x in v)


def _labels(v) -> tuple[int, ...]:
  labels = tuple(int(x) for x in v)
  if len(labels) != constants.NUM_TARGETS:
    raise ValueError(f'{len(labels)} labels, want {constants.NUM_TARGETS}')
  return labels


def parse_study(obj: dict, where: str | None = None) -> Study:
  """The ``Study`` of one manifest record; ValueError naming ``where`` (the manifest's file and
  line; by default the record's uid) and the field for anything malformed.

  The uid is checked again here (``store.uid_problem``), not only by the manifest reader: it names
  the study's folders, which the localizer replaces (rmtree) and the pipeline opens.
  """
  if not isinstance(obj, dict):
    raise ValueError(f'{where or "manifest record"}: a {type(obj).__name__}, not a JSON object')
  problem = store.uid_problem(obj.get('uid'))
  if problem:
    raise ValueError(f'{where or "manifest record"}: uid {problem}')
  where = where or f'manifest record {obj["uid"]}'

  def get(field, parse, default=_REQUIRED):
    if obj.get(field) is None:
      if default is _REQUIRED:
        raise ValueError(f'{where}: field {field} is missing')
      return default
    try:
      return parse(obj[field])
    except (AttributeError, TypeError, ValueError) as e:
      raise ValueError(f'{where}: field {field}: {e}') from None

  return Study(
      uid=obj['uid'],
      split=get('split', str, 'train'),
      shape=get('shape', lambda v: tuple(int(x) for x in v)),
      spacing_mm=get('spacing_mm', _floats),
      origin=get('origin', _floats, (0.0, 0.0, 0.0)),
      direction=get('direction', lambda v: tuple(_floats(r) for r in v),
                    tuple(tuple(r) for r in np.eye(3).tolist())),
      has_segmentation=get('has_segmentation', bool, False),
      labels=get('labels', _labels, None),
      vertebra_boxes=get('vertebra_boxes', _boxes, {}),
      predicted_vertebra_boxes=get('predicted_vertebra_boxes', _boxes, {}),
      warnings=get('warnings', tuple, ()),
      levels=get('levels', lambda v: tuple(str(k) for k in v if k in store.LEVELS), ()),
  )


_WARNED: set[str] = set()  # roots whose skipped studies were logged


def load_manifest(root: str) -> list[Study]:
  """All studies of ``root/manifest.jsonl`` whose status is "ok", sorted by uid.

  Non-ok studies are skipped and counted in the log (they failed conversion: no volume). A
  malformed record raises ValueError naming the manifest's file and line.
  """
  studies, skipped = [], {}
  for where, obj in store.iter_manifest(root):
    status = obj.get('status', 'ok')
    if status != 'ok':
      skipped[obj['uid']] = status
      continue
    studies.append(parse_study(obj, where))
  # Once per root and process: a command reads its manifest several times (splits, checks).
  if skipped and root not in _WARNED:
    _WARNED.add(root)
    logging.warning('manifest %s: skipped %d non-ok studies (e.g. %s)', root, len(skipped),
                    next(iter(skipped.items())))
  logging.vlog(1, 'manifest %s: %d ok studies', root, len(studies))
  return sorted(studies, key=lambda s: s.uid)


def _uid_key(uid: str, seed: int) -> int:
  """A stable pseudo-random rank of a uid (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.sha256(f'{seed}:{uid}'.encode()).digest()[:8], 'little')


def stratified_folds(uids: Sequence[str], labels: np.ndarray, num_folds: int,
                     seed: int = 0) -> np.ndarray:
  """Fold index in [0, num_folds) for each study, stratified on the 8-label vectors.

  Greedy multi-label stratification with exact fold sizes (after Sechidis et al. 2011):
  studies go one at a time, those whose rarest positive label is rarest first (all-negative
  ones last), each to the open fold that most lacks its label pattern: the sum over labels of
  the fold's remaining need of positives (where the study is positive) or negatives (where it
  is negative), each normalised by the label's total. Counting negatives too is what keeps the
  common labels (patient_overall) balanced, not only the rare ones. Fold sizes differ by at
  most one; on RSNA-like labels every label's positives differ by <= 2 between folds (n >= 200).
  """
  labels = np.asarray(labels, bool).reshape(len(uids), -1)
  n, k = len(uids), int(num_folds)
  if k < 1:
    raise ValueError(f'num_folds={k}')
  positives = labels.sum(0)

  def order_key(i):
    pos = positives[labels[i]]
    return (pos.min() if pos.size else n + 1, _uid_key(uids[i], seed))

  capacity = np.full(k, n // k)
  capacity[: n % k] += 1
  share = capacity / max(n, 1)
  need_pos = share[:, None] * positives[None, :]  # (k, L) positives each fold still lacks
  need_neg = share[:, None] * (n - positives)[None, :]
  norm_pos, norm_neg = np.maximum(positives, 1), np.maximum(n - positives, 1)
  fold = np.empty(n, np.int64)
  for i in sorted(range(n), key=order_key):
    y = labels[i]
    gain = np.where(y, need_pos / norm_pos, need_neg / norm_neg).sum(1)
    f = int(np.argmax(np.where(capacity > 0, gain, -np.inf)))
    fold[i] = f
    capacity[f] -= 1
    need_pos[f] -= y
    need_neg[f] -= ~y
  return fold


def labels_array(studies: Iterable[Study]) -> np.ndarray:
  return np.array([s.labels for s in studies], np.int64).reshape(-1, constants.NUM_TARGETS)


def select(studies: Sequence[Study], which: str, *, fold: int, num_folds: int,
           fold_seed: int = 0, require_segmentation: bool = False,
           require_boxes: bool = False, pseudo_labels: bool = False) -> list[Study]:
  """Studies of one split.

  which: 'train' (labelled, not in ``fold``), 'eval' (labelled, in ``fold``), 'labelled' (all
  labelled), 'test' (manifest split "test") or 'all'. ``fold=-1`` puts every labelled study in
  'train' and none in 'eval'. Unlabelled studies never enter 'train'/'eval'.
  ``require_boxes`` keeps, in 'train' and 'eval' only, the studies with true or predicted
  vertebra boxes (per-vertebra training once the localizer has run: every study it located,
  not only the segmented ones); the other splits (submissions) keep every study.
  ``pseudo_labels`` (with ``require_segmentation``) adds to 'train' the labelled studies without
  a true mask that a localizer has segmented (self-training on its predicted masks); the folds
  and 'eval' are those of the true masks alone, so a score is never against a prediction.
  """
  pseudo = []
  if require_segmentation:
    if pseudo_labels and which == 'train':
      pseudo = [s for s in studies if not s.has_segmentation and s.predicted_vertebra_boxes
                and s.labels is not None and s.split != 'test']
    studies = [s for s in studies if s.has_segmentation]
  if pseudo:
    return select(studies, which, fold=fold, num_folds=num_folds, fold_seed=fold_seed,
                  require_boxes=require_boxes) + pseudo
  if which == 'all':
    return list(studies)
  if which == 'test':
    return [s for s in studies if s.split == 'test']
  labelled = [s for s in studies if s.labels is not None and s.split != 'test']
  if which == 'labelled':
    return labelled
  if which not in ('train', 'eval'):
    raise ValueError(f'unknown split {which!r}')
  if require_boxes:
    labelled = [s for s in labelled if s.boxes]
  if fold < 0 or not labelled:  # (no labelled study: no folds to draw, an empty split)
    return labelled if which == 'train' else []
  if fold >= num_folds:
    raise ValueError(f'fold={fold} with num_folds={num_folds}')
  folds = stratified_folds([s.uid for s in labelled], labels_array(labelled), num_folds,
                           fold_seed)
  keep = (folds != fold) if which == 'train' else (folds == fold)
  return [s for s, k in zip(labelled, keep) if k]


BOX_SOURCES = ('auto', 'predicted', 'true')


def use_boxes(studies: Iterable[Study], which: str) -> list[Study]:
  """The studies as they are cropped at one kind of vertebra box (eval's and calibrate's --boxes).

  'auto': as they are (`Study.boxes`: true boxes where a mask exists, else the localizer's);
  'predicted': the localizer's boxes only, the true ones dropped: what a new scan gets, so the
  two-stage score (a study the localizer found nothing in then has no boxes); 'true': only the
  studies with a mask, at their true boxes: the second stage alone, without the first's errors.
  The masks themselves (``has_segmentation``) are untouched: boxes are what crops are made from.
  """
  if which == 'auto':
    return list(studies)
  if which == 'predicted':
    return [dataclasses.replace(s, vertebra_boxes={}) for s in studies]
  if which == 'true':
    return [dataclasses.replace(s, predicted_vertebra_boxes={}) for s in studies
            if s.vertebra_boxes]
  raise ValueError(f'boxes={which!r}: expected one of {", ".join(BOX_SOURCES)}')
