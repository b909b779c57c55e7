"""Atomic folder replacement and JSON I/O (mrl_jax.core.fileio)."""

import os
import shutil

import pytest
from testutil import TESTS

from mrl_jax.bundle.hf_folder import read_sentence_transformer
from mrl_jax.core import fileio
from mrl_jax.core.fileio import BundleError

TINY = os.path.join(TESTS, "fixtures", "tiny_st_model")


def make(path, text):
  os.makedirs(path)
  with open(os.path.join(path, "file.txt"), "w") as f:
    f.write(text)


def content(path):
  with open(os.path.join(path, "file.txt")) as f:
    return f.read()


@pytest.fixture
def old_and_new(tmp_path):
  """``out``: a valid model folder (the old one); ``tmp``: its replacement."""
  out = str(tmp_path / "enc")
  shutil.copytree(TINY, out)
  tmp = fileio.make_temp_dir(out)
  shutil.copytree(TINY, tmp, dirs_exist_ok=True)
  with open(os.path.join(tmp, "new.txt"), "w") as f:
    f.write("new")
  return out, tmp


def test_make_temp_dir_is_an_empty_sibling_with_umask_permissions(tmp_path):
  out = str(tmp_path / "sub" / "enc")
  tmp = fileio.make_temp_dir(out)
  assert os.path.dirname(tmp) == os.path.dirname(out) and os.listdir(tmp) == []
  assert os.path.basename(tmp).startswith("enc.tmp-")
  os.mkdir(tmp_path / "plain")
  assert os.stat(tmp).st_mode == os.stat(tmp_path / "plain").st_mode
  assert fileio.make_temp_dir(out) != tmp


def test_replace_into_a_new_path(tmp_path):
  tmp, out = str(tmp_path / "t"), str(tmp_path / "out")
  make(tmp, "new")
  fileio.atomic_replace_dir(tmp, out)
  assert content(out) == "new" and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_an_existing_folder(tmp_path, monkeypatch, exchange):
  tmp, out = str(tmp_path / "t"), str(tmp_path / "out")
  make(tmp, "new")
  make(out, "old")
  if not exchange:
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
  fileio.atomic_replace_dir(tmp, out)
  assert content(out) == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_failure_between_the_renames_leaves_the_old_folder_loadable(old_and_new, monkeypatch):
  out, tmp = old_and_new
  monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)  # the two-rename path
  rename, calls = os.rename, []

  def failing_second_rename(src, dst):
    calls.append((src, dst))
    if len(calls) == 2:  # out -> backup done; tmp -> out fails
      raise OSError("simulated crash")
    rename(src, dst)

  monkeypatch.setattr(fileio.os, "rename", failing_second_rename)
  with pytest.raises(OSError, match="simulated crash"):
    fileio.atomic_replace_dir(tmp, out)
  monkeypatch.undo()
  assert calls[0][0] == out and calls[1] == (tmp, out) and calls[2] == (calls[0][1], out)
  read_sentence_transformer(out)  # the old folder is back, loadable
  assert not os.path.exists(os.path.join(out, "new.txt"))
  assert sorted(os.listdir(os.path.dirname(out))) == sorted(
      ["enc", os.path.basename(tmp)])  # no backup left; tmp is the caller's to remove


def test_failed_restore_names_where_both_folders_are(old_and_new, monkeypatch):
  out, tmp = old_and_new
  monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
  rename, calls = os.rename, []

  def only_first_rename_works(src, dst):
    calls.append(src)
    if len(calls) > 1:
      raise OSError("simulated crash")
    rename(src, dst)

  monkeypatch.setattr(fileio.os, "rename", only_first_rename_works)
  with pytest.raises(OSError, match="the old folder is in .*enc.old-") as e:
    fileio.atomic_replace_dir(tmp, out)
  monkeypatch.undo()
  backup = str(e.value).split("the old folder is in ")[1].split(",")[0]
  read_sentence_transformer(backup)  # killed in between: the old folder is still whole
  read_sentence_transformer(tmp)  # and so is the new one


def test_exchange_failure_leaves_the_old_folder(old_and_new, monkeypatch):
  out, tmp = old_and_new

  def failing_exchange(a, b):
    raise OSError("simulated")

  monkeypatch.setattr(fileio, "_exchange", failing_exchange)
  with pytest.raises(OSError, match="simulated"):
    fileio.atomic_replace_dir(tmp, out)
  read_sentence_transformer(out)
  assert not os.path.exists(os.path.join(out, "new.txt"))


def test_replace_refuses_bad_paths(tmp_path):
  tmp = str(tmp_path / "t")
  make(tmp, "new")
  with pytest.raises(ValueError, match="tmp_dir"):
    fileio.atomic_replace_dir(str(tmp_path / "missing"), str(tmp_path / "out"))
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ValueError, match="not a folder"):
    fileio.atomic_replace_dir(tmp, str(tmp_path / "afile"))
  with pytest.raises(ValueError, match="contain each other"):
    fileio.atomic_replace_dir(tmp, os.path.join(tmp, "inner"))
  assert content(tmp) == "new"


def test_read_json_names_the_file(tmp_path):
  path = tmp_path / "x.json"
  with pytest.raises(BundleError, match=f"{path} is missing"):
    fileio.read_json(str(path))
  path.write_bytes(b'{"a": "\xff"}')
  with pytest.raises(BundleError, match=f"{path} is not UTF-8 text"):
    fileio.read_json(str(path))
  path.write_text('{"a": 1,')
  with pytest.raises(BundleError, match=f"{path} is not valid JSON: .* line 1"):
    fileio.read_json(str(path))
  path.write_text('{"a": Infinity}')
  with pytest.raises(BundleError, match="Infinity is not JSON"):
    fileio.read_json(str(path))
  path.write_bytes('\ufeff{"a": "é"}'.encode())
  assert fileio.read_json(str(path)) == {"a": "é"}


def test_write_json_round_trips_and_refuses_what_json_cannot_hold(tmp_path):
  path = str(tmp_path / "x.json")
  value = {"b": [1, 2.5, None, True], "a": {"ü": "é"}}
  fileio.write_json(path, value)
  assert fileio.read_json(path) == value
  with open(path, encoding="utf-8") as f:
    assert f.read().endswith("}\n")
  for bad, match in [({"w": [1.0, float("inf")]}, r"meta\['w'\]\[1\] is inf"),
                     ({1: 2}, "non-string key"), ({"f": object()}, "not JSON-serialisable")]:
    with pytest.raises(ValueError, match=match):
      fileio.write_json(str(tmp_path / "bad.json"), bad, what="meta")
  assert not os.path.exists(tmp_path / "bad.json")
