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

Arrays are written by ``ShardWriter`` (numpy and imagecodecs' c-blosc, whole shards, slab by slab
along z: the bytes TensorStore writes for the same spec, tested) and read through TensorStore.

ROOT may also be a bucket, ``s3://bucket/prefix`` or ``gs://bucket/prefix`` (``kvstore``): the
same names, as object keys, through TensorStore's KvStore. Objects are written whole by nature but
cannot be renamed, so there an array is written under its final name (zarr.json last, as always)
and a study becomes visible only through its manifest record, written after all of its arrays;
there are no temporaries and no locks (one command per output is the user's to keep).

This module imports no JAX or Flax, and TensorStore and SciPy only inside the functions that use
them (importing TensorStore costs ~0.5 s, most of it ml_dtypes): the converter's processes write
arrays without them and start fast.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import shutil
from typing import Any, Iterable, Iterator, Mapping, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  import tensorstore as ts

from cspine_jax import cli
from cspine_jax import constants
from cspine_jax.data import kvstore

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
ZARR_JSON = 'zarr.json'  # an array's metadata (write_shards writes it last)
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


def normalize_root(root: str) -> str:
  """A dataset's root as the commands use it: a local folder made absolute (also from a
  file:// URL), a bucket URL (s3://, gs://) without trailing slashes."""
  return kvstore.normalize(root)


def manifest_path(root: str) -> str:
  return kvstore.join(root, MANIFEST)


def manifest_exists(root: str) -> bool:
  return file_exists(manifest_path(root))


def dataset(root: str, named: str, write: bool = False, error=cli.UsageError) -> str:
  """``root`` normalized (``normalize_root``), checked to hold a converted dataset; raises
  ``error`` (a cli.UsageError) naming ``named`` (the flag or key, e.g. "--data") and what is
  wrong: no manifest there, or a bucket that cannot be reached, read (or, with ``write``,
  written)."""
  root = normalize_root(root)
  if kvstore.is_url(root):
    try:
      kvstore.check(root, write=write)
    except kvstore.StorageError as e:
      raise error(f'{named}={e}') from None
  if not manifest_exists(root):
    raise error(f'{named}={root}: no {MANIFEST} there (run python -m data_tools.convert first)')
  return root


def array_path(root: str, kind: str, uid: str) -> str:
  """ROOT/<kind>/<uid>: the folder of one study's array (kind: one of ARRAY_KINDS)."""
  return kvstore.join(root, kind, check_uid(uid))


def array_exists(root: str, kind: str, uid: str) -> bool:
  """Whether ROOT/<kind>/<uid> is a complete array (its zarr.json is written last)."""
  return file_exists(kvstore.join(array_path(root, kind, uid), ZARR_JSON))


# ---------------------------------------------------------------------------------------------
# Files of a folder or a bucket.
# ---------------------------------------------------------------------------------------------


def read_file(path: str) -> bytes | None:
  """The bytes of a file or object, or None when there is none."""
  if kvstore.is_url(path):
    return kvstore.read_object(path)
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    return None


def write_file(path: str, data: str | bytes) -> None:
  """Writes a file (``atomic_write``) or an object, whole or not at all."""
  if kvstore.is_url(path):
    kvstore.write_object(path, data)
  else:
    atomic_write(path, data)


def file_exists(path: str) -> bool:
  if kvstore.is_url(path):
    return kvstore.read_object(path) is not None
  return os.path.isfile(path)


def make_folders(root: str, kinds: Iterable[str]) -> None:
  """Creates ROOT and ROOT/<kind> for each kind (nothing to create in a bucket)."""
  if not kvstore.is_url(root):
    for kind in kinds:
      os.makedirs(os.path.join(root, kind), exist_ok=True)


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


class _NoLock:
  def close(self):
    pass


def try_lock(path: str):
  """The open file of an exclusive, non-blocking flock on ``path`` (made with its folder), held
  while the file stays open; None when another process holds it (one command per output). A
  bucket has no locks: an object that closes nothing."""
  if kvstore.is_url(path):
    return _NoLock()
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

  Only for a folder no other command is writing (the callers hold its lock or own it). A bucket
  holds no temporaries.
  """
  if kvstore.is_url(root):
    return
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
  data = read_file(path)
  if data is None:
    raise FileNotFoundError(f'{path}: no such file')
  for line_no, line in enumerate(data.decode('utf-8').splitlines(), start=1):
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
  write_file(manifest_path(root), ''.join(l + '\n' for l in lines))


def nonzero_box(array: np.ndarray) -> tuple[slice, ...] | None:
  """The smallest box (one slice per axis) that holds every non-zero value; None if there is none.

  Masks are mostly background (the neck is a small part of a 512^2 scan): work on a mask can skip
  the rest. One any() per axis, which numpy runs far faster than a pass of real work.
  """
  box = []
  for axis in range(array.ndim):
    hit = np.flatnonzero(array.any(axis=tuple(a for a in range(array.ndim) if a != axis)))
    if not hit.size:
      return None
    box.append(slice(int(hit[0]), int(hit[-1]) + 1))
  return tuple(box)


def vertebra_boxes(mask: np.ndarray) -> dict[str, list[int]]:
  """{"C1": [z0, y0, x0, z1, y1, x1], ...} (end-exclusive ints) of the labels 1-7 present.

  Within the mask's non-zero box, each label becomes one bit, and OR-ing the bits over two axes
  gives, along the third, where each label occurs: four passes over that box, no SciPy.
  """
  n = len(constants.VERTEBRAE)
  box = nonzero_box(mask)
  if box is None:
    return {}
  labels = mask[box]
  in_range = (labels >= 1) & (labels <= n)  # other values (thoracic, unknown) are no vertebra
  bits = (np.left_shift(1, np.where(in_range, labels - 1, 0)) * in_range).astype(np.uint8)
  profiles = [np.bitwise_or.reduce(bits, axis=tuple(a for a in range(3) if a != axis))
              for axis in range(3)]
  boxes = {}
  for i, name in enumerate(constants.VERTEBRAE):
    where = [np.flatnonzero(p & np.uint8(1 << i)) for p in profiles]
    if where[0].size:
      start = [int(w[0]) + b.start for w, b in zip(where, box)]
      stop = [int(w[-1]) + 1 + b.start for w, b in zip(where, box)]
      boxes[name] = start + stop
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
    self.folder = kvstore.join(self.root, state_dir)

  def path(self, uid: str) -> str:
    return kvstore.join(self.folder, check_uid(uid) + '.json')

  def load(self, uid: str) -> dict | None:
    """The study's record, or None when it has none (or an unreadable one)."""
    try:
      data = read_file(self.path(uid))
      return None if data is None else json.loads(data)
    except (OSError, ValueError):
      return None

  def save(self, record: Mapping[str, Any]) -> None:
    """Writes ``record`` (which names its ``uid``) atomically, as JSON with sorted keys."""
    make_folders(self.root, [self.state_dir])
    write_file(self.path(record['uid']), json.dumps(record, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# zarr3 arrays.
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
  path = os.fspath(path)
  s: dict[str, Any] = {'driver': 'zarr3', 'kvstore': (
      kvstore.spec(path) if kvstore.is_url(path) else {'driver': 'file', 'path': path})}
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
  """Creates a zarr3 array at ``path`` (which must not exist) holding ``array``, through
  TensorStore (the reference ``write_shards`` is tested against; test fixtures use it)."""
  import tensorstore as ts  # pylint: disable=redefined-outer-name  # deferred (docstring)
  store = ts.open(spec(path, array.shape, array.dtype, attributes), create=True,
                  context=context or ts.Context()).result()
  store.write(np.ascontiguousarray(array)).result()


# zarr3 without TensorStore. A sharded array is one file per shard, c/<i>/<j>/<k> (the default
# chunk key encoding): the shard's inner chunks, each encoded by the inner codecs (little-endian
# bytes, then blosc) and concatenated in C order, then the index (one little-endian (offset,
# nbytes) uint64 pair per inner chunk, 2^64-1 twice for a chunk not stored), then the index's
# crc32c. As TensorStore does, an inner chunk equal to the fill value (0) is not stored, nor a
# shard that holds none, and a chunk that sticks out of the array is padded with the fill value.
_MISSING = 2**64 - 1
_BLOSC_SHUFFLE = {'noshuffle': 0, 'shuffle': 1, 'bitshuffle': 2}
SHARD_THREADS = 2  # shards encoded at once by ShardWriter (c-blosc releases the GIL)


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)  # the Castagnoli polynomial, reflected
    table.append(c)
  return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, as zarr3's crc32c codec: only shard indexes (a few hundred
  bytes each) go through it, so a table in Python is fast enough."""
  c = 0xFFFFFFFF
  for byte in data:
    c = _CRC32C[(c ^ byte) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _zarr_json(metadata: Mapping[str, Any]) -> bytes:
  """zarr.json as TensorStore writes it for ``spec()``'s metadata: its defaults filled in, keys
  sorted, no spaces."""
  meta = json.loads(json.dumps(metadata))  # a deep copy
  meta.update({'chunk_key_encoding': {'name': 'default'}, 'fill_value': 0, 'node_type': 'array',
               'zarr_format': 3})
  for codec in meta['codecs'][0]['configuration']['codecs']:
    if codec['name'] == 'blosc':
      codec['configuration'].setdefault('blocksize', 0)
    if codec['name'] == 'bytes' and np.dtype(meta['data_type']).itemsize == 1:
      codec.pop('configuration', None)  # an endianness means nothing for one-byte values
  return json.dumps(meta, sort_keys=True, separators=(',', ':'), ensure_ascii=False,
                    allow_nan=False).encode('utf-8')


def _blosc_args(metadata: Mapping[str, Any]) -> dict:
  """imagecodecs.blosc_encode's arguments for the inner chunks ``spec()`` declares: little-
  endian bytes, then blosc. Any other codec fails here rather than writing other bytes."""
  sharding = metadata['codecs'][0]
  codecs = sharding['configuration']['codecs']
  names = [c['name'] for c in codecs]
  index_codecs = [c['name'] for c in sharding['configuration']['index_codecs']]
  if (sharding['name'] != 'sharding_indexed' or names != ['bytes', 'blosc']
      or codecs[0].get('configuration', {}).get('endian', 'little') != 'little'
      or index_codecs != ['bytes', 'crc32c']):
    raise NotImplementedError(f'write_shards: codecs {names}, index {index_codecs}')
  blosc = codecs[1]['configuration']
  return dict(level=blosc['clevel'], compressor=blosc['cname'],
              shuffle=_BLOSC_SHUFFLE[blosc['shuffle']], typesize=blosc['typesize'],
              blocksize=blosc.get('blocksize', 0), numthreads=1)


class _ShardEncoder:
  """Encodes shards into buffers it reuses (one encoder per thread): fresh buffers for every
  inner chunk cost more in page faults than the compression itself."""

  def __init__(self, dtype: np.dtype, inner, shard, blosc_args: dict):
    import imagecodecs  # pylint: disable=import-outside-toplevel  # deferred: writers only
    self.blosc_encode = imagecodecs.blosc_encode
    self.inner, self.shard, self.blosc_args = tuple(inner), tuple(shard), blosc_args
    self.per_shard = [s // i for s, i in zip(shard, inner)]
    # c-blosc is given this little-endian array (it takes the shuffle's element size from it).
    self.chunk = np.empty(inner, np.dtype(dtype).newbyteorder('<'))
    self.out = bytearray(math.prod(self.per_shard) * (self.chunk.nbytes + 16))  # + blosc header

  def encode(self, array: np.ndarray, start) -> tuple[memoryview, bytes] | None:
    """(the inner chunks' bytes, index and crc32c) of the shard of ``array`` whose first voxel is
    ``start``, or None when the shard stores nothing."""
    index = np.full((math.prod(self.per_shard), 2), _MISSING, '<u8')
    out, offset = memoryview(self.out), 0
    for n, pos in enumerate(np.ndindex(*self.per_shard)):
      lo = [s + p * i for s, p, i in zip(start, pos, self.inner)]
      part = array[tuple(slice(l, l + i) for l, i in zip(lo, self.inner))]
      if part.size == 0:  # outside the array
        continue
      if part.shape != self.inner:  # at the array's edge: padded with the fill value
        self.chunk[...] = 0
      self.chunk[tuple(slice(0, k) for k in part.shape)] = part
      if not self.chunk.any():  # all fill value (0): not stored
        continue
      size = len(self.blosc_encode(self.chunk, **self.blosc_args, out=out[offset:]))
      index[n] = offset, size
      offset += size
    if not offset:
      return None
    index_bytes = index.tobytes()
    return out[:offset], index_bytes + crc32c(index_bytes).to_bytes(4, 'little')


class ShardWriter:
  """Writes the zarr3 array of ``spec()`` at ``path`` (which must not exist) slab by slab along z,
  without TensorStore: byte for byte the files ``write_array`` (TensorStore) writes.

    writer = ShardWriter(path, shape, dtype, attributes)
    for z in range(0, shape[0], writer.slab_depth):
      writer.write(z, volume[z:z + writer.slab_depth])  # any array: a reused buffer is fine
    writer.close()  # zarr.json, last

  A slab is one row of shards along z (its shards are whole: each is encoded, SHARD_THREADS at
  once, and written by one open/write/close), so a caller can decode a volume a slab at a time
  and never hold all of it. Integer arrays only (fill value 0).
  """

  def __init__(self, path: str, shape, dtype, attributes: Mapping[str, Any] | None = None):
    dtype = np.dtype(dtype)
    if dtype.kind not in 'iub':
      raise TypeError(f'ShardWriter: integer arrays only, not {dtype}')
    self.path, self.shape = path, tuple(int(n) for n in shape)
    metadata = spec(path, self.shape, dtype, attributes)['metadata']
    self._zarr_json = _zarr_json(metadata)  # first: attributes that are not JSON fail here
    self._inner, self._shard = _chunk_shapes(self.shape)
    self.slab_depth = self._shard[0]
    self._encoders = [_ShardEncoder(dtype, self._inner, self._shard, _blosc_args(metadata))
                      for _ in range(SHARD_THREADS)]
    self._rows = [-(-n // s) for n, s in zip(self.shape[1:], self._shard[1:])]
    self._url = kvstore.is_url(path)
    if not self._url:
      os.makedirs(path)

  def _put(self, key: str, parts) -> None:
    """Writes the file (object) ``key`` of the array, made of ``parts``."""
    if self._url:
      kvstore.write_object(kvstore.join(self.path, key), b''.join(parts))
      return
    name = os.path.join(self.path, key)
    os.makedirs(os.path.dirname(name), exist_ok=True)
    with open(name, 'wb') as f:
      for part in parts:
        f.write(part)

  def write(self, z: int, slab: np.ndarray) -> None:
    """Writes the shards of z rows [z, z + len(slab)): ``z`` a multiple of slab_depth, ``slab``
    slab_depth deep (the last one: the rest of the array), its other axes the array's."""
    depth = min(self.slab_depth, self.shape[0] - z)
    if z % self.slab_depth or slab.shape != (depth,) + self.shape[1:]:
      raise ValueError(f'slab {slab.shape} at z={z}: expected ({depth}, ...) at a multiple of '
                       f'{self.slab_depth}')
    positions = list(np.ndindex(*self._rows))
    shares = [(enc, positions[i::len(self._encoders)]) for i, enc in enumerate(self._encoders)]

    def write_share(share):
      encoder, mine = share
      for j, k in mine:
        encoded = encoder.encode(slab, (0, j * self._shard[1], k * self._shard[2]))
        if encoded is not None:
          self._put(f'c/{z // self.slab_depth}/{j}/{k}', encoded)

    if len(shares) == 1:
      write_share(shares[0])
      return
    with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
      for done in pool.map(write_share, shares):
        del done  # pool.map re-raises a thread's error here

  def close(self) -> None:
    """Writes zarr.json: the array is complete."""
    self._put(ZARR_JSON, [self._zarr_json])


def write_shards(path: str, array: np.ndarray,
                 attributes: Mapping[str, Any] | None = None) -> None:
  """Creates the zarr3 array of ``spec()`` at ``path`` (which must not exist) holding ``array``,
  with ``ShardWriter``: besides ``array``, only one shard's buffers per thread (~8 MiB for int16)
  are held, never a second copy."""
  array = np.asarray(array)
  writer = ShardWriter(path, array.shape, array.dtype, attributes)
  _write_slabs(writer, array)
  writer.close()


def _write_slabs(writer: ShardWriter, array: np.ndarray) -> None:
  for z in range(0, array.shape[0], writer.slab_depth):
    writer.write(z, array[z:z + writer.slab_depth])


@contextlib.contextmanager
def new_array(root: str, kind: str, uid: str, shape, dtype,
              attributes: Mapping[str, Any] | None = None) -> Iterator[ShardWriter]:
  """A ``ShardWriter`` for ROOT/<kind>/<uid>/ under a temporary name, ``place``d (replacing any
  older one) when the block ends, after the caller wrote every slab; on an error the temporary
  is removed and what was there before is untouched.

  In a bucket (no renames) the array is written in place, after removing any older one: its
  zarr.json, last, marks it complete, and on an error what was written is removed.
  """
  if kvstore.is_url(root):
    final = array_path(root, kind, uid)
    kvstore.delete_folder(final)
    try:
      writer = ShardWriter(final, shape, dtype, attributes)
      yield writer
      writer.close()
    except BaseException:
      kvstore.delete_folder(final)
      raise
    return
  tmp = new_temp_dir(os.path.join(root, kind), uid)
  final = array_path(root, kind, uid)
  try:
    writer = ShardWriter(tmp, shape, dtype, attributes)
    yield writer
    writer.close()
    place(tmp, final)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def put_array(root: str, kind: str, uid: str, array: np.ndarray,
              attributes: Mapping[str, Any] | None = None) -> str:
  """Writes ROOT/<kind>/<uid>/ whole or not at all (``new_array``); returns its path."""
  array = np.asarray(array)
  with new_array(root, kind, uid, array.shape, array.dtype, attributes) as writer:
    _write_slabs(writer, array)
  return array_path(root, kind, uid)


def remove_array(root: str, kind: str, uid: str) -> None:
  """Removes ROOT/<kind>/<uid>/ if it exists."""
  path = array_path(root, kind, uid)
  if kvstore.is_url(path):
    kvstore.delete_folder(path)
    return
  if os.path.exists(path):
    shutil.rmtree(path)


def shared_context(cache_bytes: int = 256 << 20, concurrency: int | None = None) -> ts.Context:
  """One TensorStore context per process, with a capped chunk cache."""
  import tensorstore as ts  # pylint: disable=redefined-outer-name  # deferred (docstring)
  cfg: dict[str, Any] = {'cache_pool': {'total_bytes_limit': int(cache_bytes)}}
  if concurrency:
    cfg['data_copy_concurrency'] = {'limit': int(concurrency)}
    cfg['file_io_concurrency'] = {'limit': int(concurrency)}
  return ts.Context(cfg)


def open_array(path: str, context: ts.Context | None = None) -> ts.TensorStore:
  """Opens a contract volume read-only; cached chunks are trusted (data is immutable)."""
  import tensorstore as ts  # pylint: disable=redefined-outer-name  # deferred (docstring)
  s = spec(path)
  s['recheck_cached_data'] = 'open'
  s['recheck_cached_metadata'] = 'open'
  return ts.open(s, read=True, context=context or ts.Context()).result()


def read_attributes(path: str) -> dict:
  """The zarr3 attributes (geometry) of a volume, without opening a TensorStore array."""
  data = read_file(kvstore.join(path, ZARR_JSON))
  if data is None:
    raise FileNotFoundError(f'{kvstore.join(path, ZARR_JSON)}: no such file')
  return json.loads(data).get('attributes', {})


def read_array(path: str, context: ts.Context | None = None) -> np.ndarray:
  """Reads a whole volume into memory."""
  return open_array(path, context).read().result()
