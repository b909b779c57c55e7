"""Small file primitives for exported artifacts: atomic folder replacement and JSON I/O.

An exported folder (a sentence-transformers text encoder, an image bundle) is
written into a temporary sibling, checked, then swapped into place by
:func:`atomic_replace_dir`, so that a reader never sees a half-written folder and
an existing good folder is never deleted before its replacement is complete.
JSON files from outside are read with :func:`read_json`, whose errors name the
file; everything written is plain JSON (never a pickle).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import secrets
import shutil
import sys
from typing import Any


class BundleError(ValueError):
  """An exported folder that cannot be used: a missing file, bad JSON, inconsistent contents.

  The message always names the offending file.
  """


def make_temp_dir(out_dir: str) -> str:
  """Create and return an empty sibling folder ``<out_dir>.tmp-XXXXXXXX`` to write into.

  It lies in ``out_dir``'s parent (created if needed), so that it is on the same
  filesystem and :func:`atomic_replace_dir` can rename it. Unlike
  ``tempfile.mkdtemp`` (mode 0700) the folder gets the process' usual
  permissions (``0o777`` minus the umask), which the renamed folder keeps.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  while True:
    path = f"{out_dir}.tmp-{secrets.token_hex(4)}"
    try:
      os.mkdir(path)
      return path
    except FileExistsError:
      continue


def _unused_sibling(out_dir: str, tag: str) -> str:
  while True:
    path = f"{out_dir}.{tag}-{secrets.token_hex(4)}"
    if not os.path.lexists(path):
      return path


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``.

  Returns False (nothing done) where the call is unavailable: another OS, an old
  C library or kernel, or a filesystem without support. Raises ``OSError`` for
  any other failure.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint]
  renameat2.restype = ctypes.c_int
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
    return False
  raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def atomic_replace_dir(tmp_dir: str, out_dir: str) -> None:
  """Move the complete folder ``tmp_dir`` to ``out_dir``, replacing any folder there.

  Steps: when ``out_dir`` does not exist, one ``os.rename`` (atomic). Otherwise,
  on Linux, one atomic ``renameat2(RENAME_EXCHANGE)`` swaps the two folders and
  the old one (now at ``tmp_dir``) is deleted; elsewhere (or where the
  filesystem lacks it) the old folder is renamed to a backup
  ``<out_dir>.old-XXXXXXXX``, ``tmp_dir`` renamed to ``out_dir``, and the backup
  deleted. If the second rename fails the backup is renamed back, so an
  exception leaves ``out_dir`` holding the old folder, intact; only a process
  killed between the two renames leaves ``out_dir`` absent, with the old folder
  in the backup and the new one in ``tmp_dir``. The old folder is never deleted
  before the new one is in place.

  Args:
    tmp_dir: an existing folder holding the complete new contents; on the same
      filesystem as ``out_dir`` (see :func:`make_temp_dir`). It no longer exists
      after a successful call.
    out_dir: the destination; an existing folder there is replaced, whatever it
      holds (callers check first that it is theirs to replace).

  Raises:
    ValueError: ``tmp_dir`` is not a folder, ``out_dir`` is an existing file, or
      one path contains the other.
    OSError: a rename failed (after restoring the old folder).
  """
  tmp_dir = os.path.abspath(os.fspath(tmp_dir))
  out_dir = os.path.abspath(os.fspath(out_dir))
  if not os.path.isdir(tmp_dir) or os.path.islink(tmp_dir):
    raise ValueError(f"tmp_dir={tmp_dir!r} is not a folder")
  if os.path.lexists(out_dir) and (not os.path.isdir(out_dir) or os.path.islink(out_dir)):
    raise ValueError(f"out_dir={out_dir!r} exists and is not a folder; not replacing it")
  common = os.path.commonpath([tmp_dir, out_dir])
  if common in (tmp_dir, out_dir):
    raise ValueError(f"tmp_dir={tmp_dir!r} and out_dir={out_dir!r} must not contain each other")
  if not os.path.lexists(out_dir):
    os.rename(tmp_dir, out_dir)
    return
  if _exchange(tmp_dir, out_dir):
    shutil.rmtree(tmp_dir, ignore_errors=True)  # now the old folder
    return
  backup = _unused_sibling(out_dir, "old")
  os.rename(out_dir, backup)
  try:
    os.rename(tmp_dir, out_dir)
  except BaseException as e:
    try:
      os.rename(backup, out_dir)
    except OSError as restore_error:
      raise OSError(f"could not move {tmp_dir} to {out_dir} ({e}) nor restore the old "
                    f"folder from {backup} ({restore_error}); the old folder is in "
                    f"{backup}, the new one in {tmp_dir}") from e
    raise
  shutil.rmtree(backup, ignore_errors=True)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """``object_pairs_hook``: a JSON object, refusing a key given twice (json keeps the last)."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"the key {key!r} appears twice in one object (which value is meant?)")
    out[key] = value
  return out


def _refuse_constant(name: str):
  raise ValueError(f"{name} is not JSON")


def loads_json(text: str) -> Any:
  """The JSON value of ``text``, strictly: no duplicate keys, no ``NaN``/``Infinity``.

  The one JSON parser for data from outside (bundles, configs, JSONL records).

  Raises:
    ValueError: ``json.JSONDecodeError`` for bad syntax; a plain ``ValueError``
      for a duplicated key, a ``NaN``/``Infinity`` constant, or nesting too deep
      for the parser (tens of thousands of levels: Python's recursion limit).
  """
  try:
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
  except RecursionError:
    raise ValueError("nested too deeply to parse (arrays or objects tens of thousands of levels "
                     "deep)") from None


def read_json(path: str) -> Any:
  """The JSON value in the UTF-8 file ``path`` (:func:`loads_json`: strict).

  Raises:
    BundleError: naming ``path`` when the file is missing, unreadable, not
      UTF-8, or not valid JSON (also for ``NaN``/``Infinity``, which are not
      JSON, a key given twice in one object, and nesting too deep to parse).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise BundleError(f"{path} is missing") from None
  except OSError as e:
    raise BundleError(f"{path} cannot be read: {e}") from e
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BundleError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  try:
    return loads_json(text.removeprefix("\ufeff"))
  except json.JSONDecodeError as e:
    raise BundleError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column "
                      f"{e.colno}") from None
  except ValueError as e:
    raise BundleError(f"{path} is not valid JSON: {e}") from None


def _check_finite(value: Any, where: str) -> None:
  if isinstance(value, float) and not math.isfinite(value):
    raise ValueError(f"{where} is {value!r}, which JSON cannot hold")
  if isinstance(value, dict):
    for k, v in value.items():
      if not isinstance(k, str):
        raise ValueError(f"{where} has the non-string key {k!r}; JSON keys are strings")
      _check_finite(v, f"{where}[{k!r}]")
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _check_finite(v, f"{where}[{i}]")


def dumps_json(value: Any, *, what: str = "value") -> str:
  """``value`` as JSON text (2-space indent, sorted keys, non-ASCII kept).

  Raises:
    ValueError: naming ``what`` when ``value`` holds something JSON cannot:
      a non-finite float, a non-string key, or an object of another type.
  """
  _check_finite(value, what)
  try:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def write_json(path: str, value: Any, *, what: str = "value") -> None:
  """Write ``value`` to ``path`` as UTF-8 JSON (:func:`dumps_json`, with a final newline).

  Raises:
    ValueError: as :func:`dumps_json`, before the file is opened.
  """
  text = dumps_json(value, what=what)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text + "\n")
