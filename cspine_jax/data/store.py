"""The data contract on disk (DESIGN.md section 1): the one module that knows the layout.

  ROOT/manifest.jsonl                 one JSON object per study (read_manifest, write_manifest)
  ROOT/volumes/<UID>/                 zarr3 int16 HU, axes (z, y, x)
  ROOT/segmentations/<UID>/           zarr3 uint8 on the same grid, 1-7 = C1-C7
  ROOT/predicted_segmentations/<UID>/ the localizer's mask, same grid and labels
  ROOT/volumes_1mm/<UID>/, volumes_2mm/  derived levels: int16 HU on isotropic 1 / 2 mm grids
  ROOT/segmentations_2mm/<UID>/       the true mask on the 2 mm grid (nearest neighbour)
  ROOT/.state/<UID>.json              the converter's per-study records (``JobRecords``)
  ROOT/.localize/<UID>.json           the localizer's per-study records
  .tmp-*                              half-written files and arrays (``clean_temporaries``)

Everything here is written whole or not at all: files through ``atomic_write`` (a temporary in
the same folder, then ``os.replace``), arrays under a temporary name moved into place by
``place``. A ``kill -9`` therefore leaves only ``.tmp-*`` names, which the next run removes.

Volumes. Every volume is a zarr3 array with axes (z, y, x), sharded, with small blosc(lz4,
shuffle) inner chunks so that a random 3D crop decodes only the chunks it touches. lz4 over zstd:
on a 512x512x350 study it wrote 4x faster and served random 64^3 crops ~2x faster, for ~35% more
bytes (66 -> 90 MiB); crops are decode-bound, disk is cheap (`python -m data_tools.bench_convert
--chunks`). Geometry lives in the array's attributes. TensorStore must never be used across
``fork()``: callers open arrays inside the process (or thread) that reads them.

This module imports no JAX or Flax: the offline tools (data_tools/) import it and stay light.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
from typing import Any, Iterable, Mapping

import numpy as np
from scipy import ndimage
# Importing TensorStore starts no thread and opens nothing, so the module itself is safe to
# import in a parent that later forks. What must never cross a fork() is an open ts.Context or
# array handle: create those (shared_context, open_array) in the process that uses them.
import tensorstore as ts

from cspine_jax import constants

# ---------------------------------------------------------------------------------------------
# Layout names.
# ---------------------------------------------------------------------------------------------

MANIFEST = 'manifest.jsonl'
# Array kinds: folders of ROOT holding one zarr3 array per study, ROOT/<kind>/<UID>/.
VOLUMES = 'volumes'
SEGMENTATIONS = 'segmentations'
PREDICTED_SEGMENTATIONS = 'predicted_segmentations'
# Derived levels of each volume (cspine_jax/data/levels.py), name -> isotropic spacing (mm): the
# scan box-filtered and resampled once onto coarser grids with the volume's origin and direction,
# so that a training crop reads ~2-4 M voxels instead of the ~30 M it spans at 0.35 mm.
VOLUME_LEVELS = {'volumes_1mm': 1.0, 'volumes_2mm': 2.0}
# The true mask on the 2 mm grid (nearest neighbour), for the localizer's whole-volume crops.
LABEL_LEVELS = {'segmentations_2mm': 2.0}
LEVELS = {**VOLUME_LEVELS, **LABEL_LEVELS}
ARRAY_KINDS = (VOLUMES, SEGMENTATIONS, PREDICTED_SEGMENTATIONS) + tuple(LEVELS)
# Per-study records of the resumable commands (JobRecords folders).
CONVERT_STATE = '.state'  # data_tools.convert
LOCALIZE_STATE = '.localize'  # data_tools.localize
TMP_PREFIX = '.tmp-'  # every temporary name starts with it; clean_temporaries removes them
ZARR_JSON = 'zarr.json'  # an array's metadata; written last by TensorStore's create
# The input side (the RSNA layout, DESIGN.md section 1): INPUT/segmentations/<UID>.nii[.gz].
INPUT_SEGMENTATIONS = 'segmentations'


# A study's uid names its folders and files (ROOT/<kind>/<uid>/, ROOT/.state/<uid>.json). The
# converter takes only DICOM UIDs from its input (is_dicom_uid); everything that turns a uid into
# a path accepts, more widely, one plain path component (uid_problem): what the converter writes
# (DICOM UIDs, and "invalid-folder-..." for the records of folders it refused) and test fixtures'
# short names, but never "..", "a/b", a hidden or temporary name, so that a hand-edited manifest
# cannot point a write or an rmtree outside its folder.
_DICOM_UID_RE = re.compile(r'^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$')
_SAFE_UID_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
MAX_UID_LENGTH = 64  # DICOM's limit for a UID


def is_dicom_uid(uid) -> bool:
  """A DICOM UID: digits in dot-separated components without leading zeros, <= 64 chars."""
  return isinstance(uid, str) and len(uid) <= MAX_UID_LENGTH and bool(_DICOM_UID_RE.match(uid))


def uid_problem(uid) -> str | None:
  """What is wrong with ``uid`` as a study's name on disk, or None when it is fine."""
  if not isinstance(uid, str):
    return f'{uid!r} is not a string' if uid is not None else 'is missing'
  if not uid or len(uid) > MAX_UID_LENGTH or not _SAFE_UID_RE.match(uid):
    shown = repr(uid) if len(uid) <= 80 else repr(uid[:80]) + '...'
    return (f'{shown} is not a study UID (a DICOM UID, or letters, digits, ".", "_" and "-", '
            f'starting with a letter or digit, at most {MAX_UID_LENGTH} characters)')
  return None


def check_uid(uid) -> str:
  """``uid`` if it is safe as a path component; else ValueError saying why."""
  problem = uid_problem(uid)
  if problem:
    raise ValueError(f'uid {problem}')
  return uid


def manifest_path(root: str) -> str:
  return os.path.join(root, MANIFEST)


def array_path(root: str, kind: str, uid: str) -> str:
  """ROOT/<kind>/<uid>: the folder of one study's array (kind: one of ARRAY_KINDS)."""
  return os.path.join(root, kind, check_uid(uid))


def array_exists(root: str, kind: str, uid: str) -> bool:
  """Whether ROOT/<kind>/<uid> is a complete array (arrays are placed only when complete)."""
  return os.path.isfile(os.path.join(array_path(root, kind, uid), ZARR_JSON))


# ---------------------------------------------------------------------------------------------
# Whole-or-nothing writes.
# ---------------------------------------------------------------------------------------------


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes ``path`` whole or not at all (a temporary in its folder, then os.replace).

  A str is written as UTF-8. On any error the temporary is removed and the old file is intact.
  """
  if isinstance(data, str):
    data = data.encode('utf-8')
  fd, tmp = _create_temporary(os.path.dirname(path) or '.')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _create_temporary(folder: str) -> tuple[int, str]:
  """(fd, path) of a new, empty ``.tmp-*`` file in ``folder`` with the umask's permissions.

  Not tempfile.mkstemp: it creates files 0600, so every manifest, record and overlay would be
  unreadable by the other users of a shared dataset. Asking for 0666 and letting the kernel
  apply the umask gives what any other output gets (0644 under umask 022), without reading the
  umask (os.umask can only be read by setting it, which races with other threads).
  """
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_CLOEXEC', 0)
  for _ in range(100):
    tmp = os.path.join(folder, f'{TMP_PREFIX}{secrets.token_hex(8)}')
    try:
      return os.open(tmp, flags, 0o666), tmp
    except FileExistsError:
      continue
  raise FileExistsError(f'no free temporary name in {folder}')


def new_temp_dir(parent: str, uid: str, create: bool = False) -> str:
  """A fresh ``.tmp-<uid>-*`` path in ``parent`` (made if missing), for a folder to ``place``.

  The folder itself is removed again unless ``create``: TensorStore creates an array's folder.
  """
  os.makedirs(parent, exist_ok=True)
  for _ in range(100):
    tmp = os.path.join(parent, f'{TMP_PREFIX}{check_uid(uid)}-{secrets.token_hex(4)}')
    try:
      os.mkdir(tmp, 0o777)  # the umask's permissions (tempfile.mkdtemp's are 0700)
    except FileExistsError:
      continue
    if not create:
      os.rmdir(tmp)
    return tmp
  raise FileExistsError(f'no free temporary name in {parent}')


def try_lock(path: str):
  """The open file of an exclusive, non-blocking flock on ``path`` (made with its folder), held
  while the file stays open; None when another process holds it (one command per output)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  f = open(path, 'a')  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    return None
  return f


def place(tmp: str, final: str) -> None:
  """Moves a finished folder into place, replacing what a killed run may have left."""
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(tmp, final)


def clean_temporaries(root: str, subfolders: Iterable[str] = ()) -> None:
  """Removes what a killed run left half-written: ``.tmp-*`` in ``root`` and its ``subfolders``.

  Only for a folder no other command is writing (the callers hold its lock or own it).
  """
  for sub in (*subfolders, '.'):
    folder = os.path.join(root, sub)
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
          path = os.path.join(folder, name)
          shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# ---------------------------------------------------------------------------------------------
# The manifest.
# ---------------------------------------------------------------------------------------------


def iter_manifest(root: str) -> Iterable[tuple[str, dict]]:
  """("ROOT/manifest.jsonl:<line>", record) for every record, in file order, every status.

  Each record is a JSON object with a safe ``uid`` (``uid_problem``) not seen on an earlier line;
  anything else raises ValueError naming the file, the line and what is wrong (the manifest can
  be edited by hand, and its uids become paths).
  """
  path = manifest_path(root)
  seen: dict[str, int] = {}
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{line_no}'
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise ValueError(f'{where}: not valid JSON ({e})') from None
      if not isinstance(obj, dict):
        raise ValueError(f'{where}: a {type(obj).__name__}, not a JSON object')
      problem = uid_problem(obj.get('uid'))
      if problem:
        raise ValueError(f'{where}: uid {problem}')
      if obj['uid'] in seen:
        raise ValueError(f'{where}: uid {obj["uid"]} is already on line {seen[obj["uid"]]}')
      seen[obj['uid']] = line_no
      yield where, obj


def read_manifest(root: str) -> list[dict]:
  """Every record of ROOT/manifest.jsonl as written (every status, file order), each with a
  safe, unique uid (ValueError naming the line otherwise; see ``iter_manifest``)."""
  return [obj for _, obj in iter_manifest(root)]


def write_manifest(root: str, records: Iterable[dict]) -> None:
  """Writes ROOT/manifest.jsonl atomically: one JSON object a line (sorted keys), by uid."""
  lines = [json.dumps(r, sort_keys=True) for r in sorted(records, key=lambda r: r['uid'])]
  atomic_write(manifest_path(root), ''.join(l + '\n' for l in lines))


def vertebra_boxes(mask: np.ndarray) -> dict[str, list[int]]:
  """{"C1": [z0, y0, x0, z1, y1, x1], ...} (end-exclusive ints) of the labels 1-7 present."""
  boxes = {}
  for i, sl in enumerate(ndimage.find_objects(mask, max_label=len(constants.VERTEBRAE))):
    if sl is not None:
      boxes[constants.VERTEBRAE[i]] = [int(s.start) for s in sl] + [int(s.stop) for s in sl]
  return boxes


# ---------------------------------------------------------------------------------------------
# Resumable jobs: one finished record per study.
# ---------------------------------------------------------------------------------------------


class JobRecords:
  """Per-study records of a resumable command: ROOT/<state_dir>/<UID>.json.

  A command saves a study's record after its outputs are in place, so a record means "done"
  (callers also check the outputs exist); a rerun loads it and skips the study.
  ``JobRecords(root, CONVERT_STATE)`` for the converter, ``(root, LOCALIZE_STATE)`` the localizer.
  """

  def __init__(self, root: str, state_dir: str):
    self.root = os.fspath(root)
    self.state_dir = state_dir
    self.folder = os.path.join(self.root, state_dir)

  def path(self, uid: str) -> str:
    return os.path.join(self.folder, check_uid(uid) + '.json')

  def load(self, uid: str) -> dict | None:
    """The study's record, or None when it has none (or an unreadable one)."""
    try:
      with open(self.path(uid)) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def save(self, record: Mapping[str, Any]) -> None:
    """Writes ``record`` (which names its ``uid``) atomically, as JSON with sorted keys."""
    os.makedirs(self.folder, exist_ok=True)
    atomic_write(self.path(record['uid']), json.dumps(record, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# zarr3 arrays (TensorStore).
# ---------------------------------------------------------------------------------------------

# Inner (read) chunk and shard shapes, (z, y, x), chosen for random 64^3..96^3 crops by
# `python -m data_tools.bench_convert --chunks` (figures in the README).
READ_CHUNK = (32, 64, 64)
SHARD = (64, 256, 256)


def _chunk_shapes(shape, read_chunk=READ_CHUNK) -> tuple[list[int], list[int]]:
  """(inner read chunk, shard) shapes for an array: the shard a multiple of the chunk."""
  inner = [max(1, min(c, n)) for c, n in zip(read_chunk, shape)]
  shard = [i * max(1, min(-(-n // i), s // i)) for i, n, s in zip(inner, shape, SHARD)]
  return inner, shard


def spec(path: str, shape=None, dtype=None, attributes: Mapping[str, Any] | None = None,
         read_chunk=READ_CHUNK) -> dict:
  """TensorStore spec of a contract volume at ``path`` (created when shape is given)."""
  s: dict[str, Any] = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': os.fspath(path)}}
  if shape is not None:
    dt = np.dtype(dtype)
    inner, shard = _chunk_shapes(shape, read_chunk)
    s['metadata'] = {
        'shape': [int(n) for n in shape],
        'data_type': dt.name,
        'dimension_names': ['z', 'y', 'x'],
        'chunk_grid': {'name': 'regular',
                       'configuration': {'chunk_shape': shard}},
        'codecs': [{
            'name': 'sharding_indexed',
            'configuration': {
                'chunk_shape': inner,
                'codecs': [
                    {'name': 'bytes', 'configuration': {'endian': 'little'}},
                    {'name': 'blosc', 'configuration': {
                        'cname': 'lz4', 'clevel': 5, 'shuffle': 'shuffle',
                        'typesize': dt.itemsize}},
                ],
                'index_codecs': [
                    {'name': 'bytes', 'configuration': {'endian': 'little'}},
                    {'name': 'crc32c'},
                ],
            },
        }],
        'attributes': dict(attributes or {}),
    }
  return s


def write_array(path: str, array: np.ndarray, attributes: Mapping[str, Any] | None = None,
                context: ts.Context | None = None) -> None:
  """Creates a zarr3 array at ``path`` (which must not exist) holding ``array``."""
  store = ts.open(spec(path, array.shape, array.dtype, attributes), create=True,
                  context=context or ts.Context()).result()
  store.write(np.ascontiguousarray(array)).result()


def put_array(root: str, kind: str, uid: str, array: np.ndarray,
              attributes: Mapping[str, Any] | None = None,
              context: ts.Context | None = None) -> str:
  """Writes ROOT/<kind>/<uid>/ whole or not at all, replacing any older one; returns its path.

  The array is written under a temporary name in the same folder and then ``place``d; on error
  the temporary is removed and what was there before is untouched.
  """
  tmp = new_temp_dir(os.path.join(root, kind), uid)
  final = array_path(root, kind, uid)
  try:
    write_array(tmp, array, attributes, context)
    place(tmp, final)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return final


def remove_array(root: str, kind: str, uid: str) -> None:
  """Removes ROOT/<kind>/<uid>/ if it exists."""
  path = array_path(root, kind, uid)
  if os.path.exists(path):
    shutil.rmtree(path)


def shared_context(cache_bytes: int = 256 << 20, concurrency: int | None = None) -> ts.Context:
  """One TensorStore context per process, with a capped chunk cache."""
  cfg: dict[str, Any] = {'cache_pool': {'total_bytes_limit': int(cache_bytes)}}
  if concurrency:
    cfg['data_copy_concurrency'] = {'limit': int(concurrency)}
    cfg['file_io_concurrency'] = {'limit': int(concurrency)}
  return ts.Context(cfg)


def open_array(path: str, context: ts.Context | None = None) -> ts.TensorStore:
  """Opens a contract volume read-only; cached chunks are trusted (data is immutable)."""
  s = spec(path)
  s['recheck_cached_data'] = 'open'
  s['recheck_cached_metadata'] = 'open'
  return ts.open(s, read=True, context=context or ts.Context()).result()


def read_attributes(path: str) -> dict:
  """The zarr3 attributes (geometry) of a volume, without opening TensorStore."""
  with open(os.path.join(path, ZARR_JSON)) as f:
    return json.load(f).get('attributes', {})


def read_array(path: str, context: ts.Context | None = None) -> np.ndarray:
  """Reads a whole volume into memory."""
  return open_array(path, context).read().result()
