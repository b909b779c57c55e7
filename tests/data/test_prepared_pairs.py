"""Prepared pair shards: the batches equal tokenize_pairs of the in-memory mixture, resume is
exact, a changed file or tokenizer is re-prepared, bad records are found before training, and
the no-duplicates sampler never puts a text twice in a batch (checked on the raw texts)."""

import json
import os

import jax
import numpy as np
import pytest
from testutil import REPO

from mrl_jax import experiments
from mrl_jax.data import pair_batches as pb
from mrl_jax.data import prepared_pairs as pp
from mrl_jax.data.text import PairMixture, read_text_pairs, tokenize_pairs
from mrl_jax.tokenizer import bucket_lengths, word_tokenizer

EXAMPLES = os.path.join(REPO, "examples", "text")
PAIRS = os.path.join(EXAMPLES, "train_pairs.jsonl")
NEGATIVES = os.path.join(EXAMPLES, "train_hard_negatives.jsonl")
BUCKETS = bucket_lengths(16, smallest=4)


def _tokenizer(*files, max_length=16):
  texts = [t for f in files for r in [read_text_pairs(f)]
           for t in (*r.anchors, *r.positives, *(n for row in r.negatives for n in row))]
  return word_tokenizer(texts, max_length=max_length)


def _equal(got, want):
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert jax.tree.structure(got) == jax.tree.structure(want)


@pytest.mark.parametrize("shared", [False, True])
def test_batches_equal_tokenize_pairs_of_the_mixture_and_split_over_processes(tmp_path, shared):
  tok = _tokenizer(PAIRS, NEGATIVES)
  # rows_per_shard=7: rows span several ArrayRecord files.
  sources = [pp.PreparedPairs(str(tmp_path / name)) for name, f in (("p", PAIRS), ("n", NEGATIVES))
             if pp.prepare_pairs(f, str(tmp_path / name), tok, rows_per_shard=7)]
  assert len(sources[0].manifest["shards"]) == 7 and sources[1].columns == (
      "anchor", "positive", "negative_1", "negative_2")
  mixture = PairMixture([read_text_pairs(PAIRS), read_text_pairs(NEGATIVES)], (1.0, 2.0),
                        batch_size=4, seed=3)
  one = pb.LocalBatches(sources, (1.0, 2.0), batch_size=4, seed=3, buckets=BUCKETS,
                        shared_length=shared)
  two = [pb.LocalBatches(sources, (1.0, 2.0), batch_size=4, seed=3, buckets=BUCKETS,
                         shared_length=shared, process_index=p, process_count=2)
         for p in range(2)]
  seen_negatives = False
  for step in range(12):
    want = tokenize_pairs(tok, mixture.batch(step), buckets=BUCKETS, shared_length=shared)
    got = one(step)
    _equal(got, want)
    halves = [t(step) for t in two]
    _equal(jax.tree.map(lambda a, b: np.concatenate([a, b]), *halves), want)
    seen_negatives |= "negative" in got
  assert seen_negatives


def test_resume_at_step_k_equals_a_straight_run_with_and_without_workers(tmp_path):
  tok = _tokenizer(PAIRS)
  pp.prepare_pairs(PAIRS, str(tmp_path / "p"), tok)
  batches = pb.LocalBatches([pp.PreparedPairs(str(tmp_path / "p"))], None, batch_size=8,
                            seed=1, buckets=BUCKETS, batch_sampler="no_duplicates")
  straight = pb.train_batches(batches, start_step=0)
  run = [next(straight) for _ in range(9)]
  for workers in (0, 1):
    resumed = pb.train_batches(batches, start_step=6, worker_count=workers)
    try:
      for k in range(6, 9):
        _equal(next(resumed), run[k])
    finally:
      resumed.close()
  straight.close()


def _write(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_changed_file_or_tokenizer_is_prepared_again_never_mixed(tmp_path):
  src = str(tmp_path / "pairs.jsonl")
  rows = [{"anchor": f"cat {i}", "positive": f"dog {i}"} for i in range(10)]
  _write(src, rows)
  tok = _tokenizer(src)
  out = str(tmp_path / "prep")
  assert pp.ensure_prepared(src, out, tok) is True
  assert pp.ensure_prepared(src, out, tok) is False
  os.utime(src, ns=(1, 1))  # same bytes, new mtime: the SHA-256 says it is the same file
  assert pp.prepared_reason(out, src, tok) is None
  _write(src, rows[:9] + [{"anchor": "cat 9", "positive": "dog 8"}])  # same size, new text
  assert "changed" in pp.prepared_reason(out, src, tok)
  assert pp.ensure_prepared(src, out, tok) is True
  assert pp.PreparedPairs(out).records([9])[0][0][1].tolist() == tok(["dog 8"])[
      "input_ids"][0].tolist()
  other = _tokenizer(src, max_length=8)
  assert "another tokenizer" in pp.prepared_reason(out, src, other)
  with pytest.raises(ValueError, match="prepared with another tokenizer"):
    pp.PreparedPairs(out, tokenizer_sha256=pp.tokenizer_sha256(other))
  manifest = pp.PreparedPairs(out).manifest
  assert manifest["num_rows"] == 10 and manifest["source"]["sha256"] == pp.file_sha256(src)
  assert manifest["bucket_lengths"] == list(bucket_lengths(16))


def test_a_bad_record_names_file_and_line_and_leaves_no_folder(tmp_path):
  src = str(tmp_path / "bad.jsonl")
  with open(src, "w") as f:
    f.write('{"anchor": "a", "positive": "b"}\n' * 3000 + '{"anchor": "a"}\n')
  tok = _tokenizer(PAIRS)
  with pytest.raises(ValueError, match=r"bad.jsonl:3001: missing column 'positive'"):
    pp.prepare_pairs(src, str(tmp_path / "out"), tok)
  assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_records_round_trip_and_a_corrupt_record_is_refused():
  ids, types = pp.decode_record(pp.encode_record([[2, 7, 3], [2, 3]], [[0, 0, 1], [0, 0]]))
  assert [x.tolist() for x in ids] == [[2, 7, 3], [2, 3]]
  assert [x.tolist() for x in types] == [[0, 0, 1], [0, 0]]
  with pytest.raises(ValueError, match="row 5: record of"):
    pp.decode_record(pp.encode_record([[1], [2]], [[0], [0]])[:-1], "row 5")


def _reference_no_duplicates(texts, mixture, step):
  """The sampler's rule on the raw texts (strings, no hashes), a slow obvious version."""
  size, n = mixture.batch_size, len(texts)
  rng = np.random.default_rng([mixture.seed, 3, step])
  chosen, seen = [], set()
  candidates = [r for _, r in mixture.batch_indices(step)]
  while True:
    for r in candidates:
      if len(chosen) < size and r not in chosen and not seen & set(texts[r]):
        chosen.append(r)
        seen |= set(texts[r])
    if len(chosen) == size:
      return chosen
    candidates = rng.integers(0, n, size).tolist()


def test_no_duplicates_sampler_never_repeats_a_text_in_a_batch(tmp_path):
  # 40 rows over 12 anchors, 15 positives and 9 negatives: plenty of duplicates.
  rows = [{"anchor": f"cat {i % 12}", "positive": f"dog {i % 15}", "negative": f"red {i % 9}"}
          for i in range(40)]
  src = str(tmp_path / "dups.jsonl")
  _write(src, rows)
  tok = _tokenizer(src)
  pp.prepare_pairs(src, str(tmp_path / "p"), tok)
  source = pp.PreparedPairs(str(tmp_path / "p"))
  texts = [(r["anchor"], r["positive"], r["negative"]) for r in rows]
  mixture = PairMixture([source], batch_size=6, seed=5)
  some_replaced = False
  for step in range(40):
    k, got = pb.global_rows(mixture, step, batch_sampler="no_duplicates")
    flat = [t for r in got for t in texts[r]]
    assert len(flat) == len(set(flat)) == 18, step  # the brute-force check
    assert got.tolist() == _reference_no_duplicates(texts, mixture, step)
    default = [r for _, r in mixture.batch_indices(step)]
    assert pb.global_rows(mixture, step)[1].tolist() == default
    some_replaced |= got.tolist() != default
  assert some_replaced
  # Deterministic per (seed, step): a fresh mixture gives the same batch.
  again = PairMixture([pp.PreparedPairs(str(tmp_path / "p"))], batch_size=6, seed=5)
  assert (pb.global_rows(again, 17, batch_sampler="no_duplicates")[1].tolist()
          == pb.global_rows(mixture, 17, batch_sampler="no_duplicates")[1].tolist())
  with pytest.raises(ValueError, match="without a duplicate text"):
    pb.global_rows(PairMixture([source], batch_size=10, seed=0), 0,
                   batch_sampler="no_duplicates")


def test_prepare_command_then_the_pairs_task_trains_from_the_folder(tmp_path, capsys):
  from testutil import tiny_text_config

  from mrl_jax.data.prepare_pairs import main
  from mrl_jax.tasks.pairs import PairsTask
  from mrl_jax.train import sharding as sharding_lib

  out = str(tmp_path / "prepared")
  assert main([f"--input={PAIRS},{NEGATIVES}", f"--output={out}", "--word_vocabulary",
               "--max_length=16"]) == 0
  assert "48 rows from" in capsys.readouterr().out
  assert main([f"--input={PAIRS},{NEGATIVES}", f"--output={out}", "--word_vocabulary",
               "--max_length=16"]) == 0
  assert capsys.readouterr().out.count("already prepared") == 2
  # Another vocabulary (from one file only) is another tokenizer: prepared again.
  assert main([f"--input={PAIRS}", f"--output={out}", "--word_vocabulary",
               "--max_length=16"]) == 0
  assert "48 rows from" in capsys.readouterr().out
  assert main([f"--input={PAIRS},{NEGATIVES}", f"--output={out}", "--word_vocabulary",
               "--max_length=16"]) == 0
  bad = tmp_path / "bad.tsv"
  bad.write_text("anchor\tpositive\na\tb\nc\n")
  assert main([f"--input={bad}", f"--output={out}", "--word_vocabulary"]) == 2
  assert "bad.tsv:3: expected 2 tab-separated fields" in capsys.readouterr().err
  folders = f"{out}/train_pairs.jsonl,{out}/train_hard_negatives.jsonl"
  config = experiments.task_spec(tiny_text_config(
      train_file=folders, batch_size=4, batch_sampler="no_duplicates", train_weights=(1.0, 1.0)))
  task = PairsTask(config, workdir=str(tmp_path / "w"), mesh=sharding_lib.make_mesh())
  assert [len(s) for s in task.sources] == [48, 12]
  batches = task.train_batches(0)
  try:
    batch = next(batches)
  finally:
    batches.close()
  assert batch["anchor"]["input_ids"].shape[0] == 4
  # A raw file is prepared into WORKDIR/prepared once, then reused.
  raw = PairsTask(experiments.task_spec(tiny_text_config()), workdir=str(tmp_path / "r"),
                  mesh=sharding_lib.make_mesh())
  prepared = os.path.join(str(tmp_path / "r"), "prepared", "train_pairs.jsonl")
  assert raw.sources[0].directory == prepared
  assert pp.prepared_reason(prepared, PAIRS, raw.tokenizer) is None
