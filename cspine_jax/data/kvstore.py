"""Where a converted dataset lives: a local folder, or a bucket through TensorStore's KvStore.

  ROOT = /data/cspine | file:///data/cspine | s3://bucket/prefix | gs://bucket/prefix

Every file of the data contract (manifest, per-study records, zarr3 arrays) goes through the same
kvstore: TensorStore's own `s3` and `gcs` drivers, no second storage library. ``store`` keeps the
local-folder code (atomic renames, locks) and sends URL roots here.

S3 and S3-compatible stores (MinIO, Ceph, a local test server) are configured by the AWS SDKs'
standard variables, mapped onto the driver's options:
  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL  -> ``endpoint`` (absent: AWS itself)
  AWS_REGION or AWS_DEFAULT_REGION         -> ``aws_region``
  AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN) -> ``aws_credentials`` of type
      "environment"; without them "default" (AWS_PROFILE / ~/.aws, then the instance's role).
Google Cloud Storage uses Application Default Credentials (``gcloud auth application-default
login``, or the VM's service account).

``check`` opens a root once at the start of a command and turns what can go wrong (no such
bucket, no or wrong credentials, an endpoint that does not answer) into one line naming the URL,
before anything is written.

Objects are written whole by nature (a PUT is atomic), but nothing can be renamed: an array is
written under its final name, its zarr.json last, and a study becomes visible to readers only
through its manifest record, written after all its arrays (DESIGN.md section 1).
"""
from __future__ import annotations

import json
import os
import threading
import urllib.parse
from typing import TYPE_CHECKING

from cspine_jax import cli

if TYPE_CHECKING:
  import tensorstore as ts

SCHEMES = ('s3', 'gs')  # bucket URLs; file:// is a local folder
# Retries of a request that failed for a reason that may pass (a 5xx, a dropped connection):
# TensorStore's default backs off up to 32 times (minutes); a command that cannot reach its store
# should say so in seconds. check() tries once more than twice, the work a few times more.
_WORK_RETRIES = {'max_retries': 6, 'initial_delay': '0.2s', 'max_delay': '5s'}
_CHECK_RETRIES = {'max_retries': 2, 'initial_delay': '0.1s', 'max_delay': '0.5s'}


class StorageError(cli.UsageError):
  """A kvstore URL that cannot be used as given (exit 2): the message names it and why."""


def is_url(root) -> bool:
  """Whether ``root`` names a bucket (s3://, gs://) rather than a local folder."""
  return isinstance(root, str) and urllib.parse.urlsplit(root).scheme in SCHEMES


def normalize(root: str) -> str:
  """A bucket URL without trailing slashes; a local folder (file:// URL or path) made absolute."""
  root = os.fspath(root)
  if is_url(root):
    parts = urllib.parse.urlsplit(root)
    if not parts.netloc:
      raise StorageError(f'{root}: no bucket name (expected {parts.scheme}://BUCKET/PREFIX)')
    return root.rstrip('/')
  if root.startswith('file://'):
    root = urllib.parse.unquote(urllib.parse.urlsplit(root).path)
  return os.path.abspath(root)


def join(root: str, *parts: str) -> str:
  """``os.path.join`` for a folder, '/'-joined for a URL."""
  if is_url(root):
    return '/'.join([root.rstrip('/'), *parts])
  return os.path.join(root, *parts)


def _environment_credentials() -> dict:
  """aws_credentials from the standard variables; StorageError for a half-set pair."""
  key, secret = os.environ.get('AWS_ACCESS_KEY_ID'), os.environ.get('AWS_SECRET_ACCESS_KEY')
  if key and not secret:
    raise StorageError('AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both '
                       '(or neither, to use AWS_PROFILE / ~/.aws or the instance role)')
  if secret and not key:
    raise StorageError('AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both')
  return {'type': 'environment'} if key else {'type': 'default'}


def spec(url: str, retries: dict | None = None) -> dict:
  """The TensorStore kvstore spec of a bucket URL (a "folder": its path ends with "/")."""
  parts = urllib.parse.urlsplit(url)
  bucket, path = parts.netloc, parts.path.strip('/')
  path = path + '/' if path else ''
  if parts.scheme == 'gs':
    s = {'driver': 'gcs', 'bucket': bucket, 'path': path,
         'context': {'gcs_request_retries': dict(retries or _WORK_RETRIES)}}
    return s
  s = {'driver': 's3', 'bucket': bucket, 'path': path,
       'aws_credentials': _environment_credentials(),
       'context': {'s3_request_retries': dict(retries or _WORK_RETRIES)}}
  endpoint = os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
  if endpoint:
    s['endpoint'] = endpoint
  region = os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION')
  if region:
    s['aws_region'] = region
  return s


def _explain(url: str, error: Exception, what: str = '') -> str:
  """One line for what TensorStore said about ``url``: the cause a user can act on first."""
  text = ' '.join(str(error).split())
  endpoint = os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
  s3 = url.startswith('s3:')
  where = f' at {endpoint} (AWS_ENDPOINT_URL)' if endpoint and s3 else ''
  bucket = urllib.parse.urlsplit(url).netloc
  if 'NoSuchBucket' in text:
    why = f'bucket {bucket!r} does not exist{where}'
  elif 'Could not connect' in text or 'CURL error' in text or 'Could not resolve' in text:
    why = f'cannot reach the store{where or " (check AWS_ENDPOINT_URL and the network)"}'
  elif 'credentials' in text.lower() or 'environment variables' in text:
    why = ('no usable credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or '
           'AWS_PROFILE)' if s3 else 'no usable Google credentials (gcloud auth '
           'application-default login)')
  elif any(m in text for m in ('AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch',
                               'PERMISSION_DENIED', 'PermissionDenied')):
    why = 'access denied: the credentials are wrong or lack permission on this bucket'
  else:
    why = text[:300]
  return f'{url}: {what + ": " if what else ""}{why}'


def check(url: str, write: bool) -> None:
  """Raises StorageError, naming ``url`` and the cause, unless it can be listed (and, with
  ``write``, written: a probe object is written and deleted). Nothing else is written."""
  import tensorstore as ts  # pylint: disable=redefined-outer-name  # deferred: ~0.5 s to import
  try:
    kv = ts.KvStore.open(spec(url, _CHECK_RETRIES)).result(timeout=60)
    kv.list(ts.KvStore.KeyRange('', '\x00')).result(timeout=60)  # lists at most one key
    if write:
      probe = f'.tmp-probe-{os.getpid()}-{threading.get_ident()}'
      kv.write(probe, b'').result(timeout=60)
      kv.delete_range(ts.KvStore.KeyRange(probe, probe + '\x00')).result(timeout=60)
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # TensorStore raises ValueError/Timeout
    raise StorageError(_explain(url, e)) from None


# One KvStore per bucket and process (TensorStore handles never cross a fork): every object
# below is addressed by its full URL, split here into the bucket's handle and the key.
_OPEN: dict = {}
_OPEN_LOCK = threading.Lock()


def _handle(url: str) -> tuple[ts.KvStore, str]:
  """(the KvStore of url's bucket, url's key in it)."""
  import tensorstore as ts  # pylint: disable=redefined-outer-name
  parts = urllib.parse.urlsplit(url)
  bucket_spec = spec(f'{parts.scheme}://{parts.netloc}')
  # The spec in the key: a handle opened before AWS_ENDPOINT_URL (say) changed is not reused.
  cache_key = (os.getpid(), json.dumps(bucket_spec, sort_keys=True))
  with _OPEN_LOCK:
    kv = _OPEN.get(cache_key)
    if kv is None:
      try:
        kv = _OPEN[cache_key] = ts.KvStore.open(bucket_spec).result()
      except StorageError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        raise StorageError(_explain(url, e)) from None
  return kv, parts.path.lstrip('/')


def read_object(url: str) -> bytes | None:
  """The object at ``url``, or None when there is none."""
  kv, key = _handle(url)
  try:
    result = kv.read(key).result()
  except Exception as e:  # pylint: disable=broad-except
    raise cli.Failure(_explain(url, e, 'read')) from None
  return bytes(result.value) if result.state == 'value' else None


def write_object(url: str, data: bytes | str) -> None:
  """Writes the object at ``url`` (whole: an object store has no partial objects)."""
  if isinstance(data, str):
    data = data.encode('utf-8')
  kv, key = _handle(url)
  try:
    kv.write(key, bytes(data)).result()
  except Exception as e:  # pylint: disable=broad-except
    raise cli.Failure(_explain(url, e, 'write')) from None


def _prefix_range(prefix: str):
  import tensorstore as ts  # pylint: disable=redefined-outer-name
  if not prefix:
    return ts.KvStore.KeyRange()
  end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # the first key after every key with the prefix
  return ts.KvStore.KeyRange(prefix, end)


def list_folder(url: str) -> list[str]:
  """The keys under the "folder" ``url`` (relative to it, sorted), at any depth."""
  kv, key = _handle(url.rstrip('/') + '/')
  try:
    keys = kv.list(_prefix_range(key), strip_prefix_length=len(key.encode())).result()
  except Exception as e:  # pylint: disable=broad-except
    raise cli.Failure(_explain(url, e, 'list')) from None
  return sorted(k.decode('utf-8') for k in keys)


def delete_folder(url: str) -> None:
  """Deletes every object under the "folder" ``url``."""
  kv, key = _handle(url.rstrip('/') + '/')
  try:
    kv.delete_range(_prefix_range(key)).result()
  except Exception as e:  # pylint: disable=broad-except
    raise cli.Failure(_explain(url, e, 'delete')) from None
