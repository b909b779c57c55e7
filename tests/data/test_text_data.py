"""Pair readers, the tokenizer wrapper, and per-dim Spearman evaluation."""

import json

import numpy as np
import pytest
from testutil import make_tokenizer_json

from mrl_jax.data.text import (
  PairMixture,
  TextPairs,
  read_scored_pairs,
  read_text_pairs,
  tokenize_pairs,
)
from mrl_jax.evaluate.sts import cosine_per_dim, spearman, spearman_per_dim
from mrl_jax.tokenizer import TextTokenizer, bucket_lengths


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  make_tokenizer_json(path)
  return TextTokenizer.from_file(path, max_length=6)


def test_tokenizer_pads_truncates_and_marks_padding(tokenizer):
  out = tokenizer(["The cat sat", "a dog ran on the big mat ."])
  assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
  assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 6)  # truncated
  np.testing.assert_array_equal(out["attention_mask"], [[1] * 5 + [0], [1] * 6])
  assert out["input_ids"][0, 0] == 2 and out["input_ids"][0, 4] == 3  # [CLS] ... [SEP]
  assert out["input_ids"][0, 5] == tokenizer.pad_id == 0
  assert tokenizer(["the cat"], pad_to=6)["input_ids"].shape == (1, 6)
  with pytest.raises(ValueError, match="shorter than"):
    tokenizer(["a dog ran on the mat"], pad_to=3)
  with pytest.raises(ValueError, match="not one string"):
    tokenizer("the cat")


def test_read_scored_pairs(tmp_path):
  path = tmp_path / "sts.jsonl"
  path.write_text('{"sentence1": "a", "sentence2": "b", "score": 4.5}\n'
                  '{"sentence1": "c", "sentence2": "d", "score": "1"}\n')
  a, b, scores = read_scored_pairs(str(path))
  assert a == ["a", "c"] and b == ["b", "d"]
  np.testing.assert_array_equal(scores, np.array([4.5, 1.0], np.float32))
  path.write_text('{"sentence1": "a", "sentence2": "b", "score": "high"}\n')
  with pytest.raises(ValueError, match="not a number"):
    read_scored_pairs(str(path))


def _spearman_reference(x, y):
  """Pearson correlation of tie-averaged ranks, ranks computed by brute force."""
  def ranks(v):
    v = np.asarray(v, np.float64)
    return np.array([np.sum(v < t) + (np.sum(v == t) + 1) / 2 for t in v])
  return np.corrcoef(ranks(x), ranks(y))[0, 1]


def test_spearman_matches_a_rank_reference_and_refuses_nan():
  assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
  assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert spearman([10, 30, 20, 20], [5, 9, 1, 7]) == pytest.approx(
      np.corrcoef([1, 4, 2.5, 2.5], [2, 4, 1, 3])[0, 1])
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 5, 30), rng.normal(size=30)  # many ties in x
  assert spearman(x, y) == pytest.approx(_spearman_reference(x, y))
  assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant: undefined, documented
  for bad in ([1.0, np.nan, 3.0], [1.0, np.inf, 3.0]):
    with pytest.raises(ValueError, match="non-finite"):
      spearman(bad, [1, 2, 3])
  with pytest.raises(ValueError, match="length >= 2"):
    spearman([1, 2], [1, 2, 3])


def test_spearman_per_dim_refuses_nan_scores_and_embeddings():
  rng = np.random.default_rng(1)
  a, b, scores = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)), rng.uniform(0, 5, 6)
  got = spearman_per_dim(a, b, scores, (2, 4))
  want = _spearman_reference(np.sum(a * b, 1) / np.linalg.norm(a, axis=1)
                             / np.linalg.norm(b, axis=1), scores)
  assert got[4] == pytest.approx(want)
  with pytest.raises(ValueError, match="gold scores have 1 NaN"):
    spearman_per_dim(a, b, np.where(np.arange(6) == 3, np.nan, scores), (2, 4))
  b[2, 3] = np.nan  # NaN only beyond dim 2: still refused
  with pytest.raises(ValueError, match="row 2"):
    spearman_per_dim(a, b, scores, (2,))


def test_spearman_per_dim_truncates_before_normalising():
  rng = np.random.default_rng(0)
  n = 40
  scores = rng.uniform(0, 5, n)
  # First 2 dims carry the score (cosine grows with it); dims 2..8 are noise.
  angle = (5 - scores) / 5 * np.pi / 2
  a = np.concatenate([np.ones((n, 1)), np.zeros((n, 1)), rng.normal(size=(n, 6))], 1)
  b = np.concatenate([np.cos(angle)[:, None], np.sin(angle)[:, None],
                      rng.normal(size=(n, 6)) * 10], 1)
  got = spearman_per_dim(a, b, scores, (2, 8))
  assert got[2] == pytest.approx(1.0) and abs(got[8]) < 0.5
  cos = cosine_per_dim(a, b, (1, 2, 8))
  np.testing.assert_allclose(cos[1], np.cos(angle))
  np.testing.assert_allclose(cos[0], 1.0)
  with pytest.raises(ValueError, match="larger than the embedding size"):
    cosine_per_dim(a, b, (2, 16))
  with pytest.raises(ValueError, match="scores must be"):
    spearman_per_dim(a, b, scores[:-1], (2,))


# --- read_text_pairs -------------------------------------------------------------

ROWS = [{"anchor": "the cat", "positive": "a cat", "negative_1": "a dog", "negative_2": "a tree"},
        {"anchor": "red house", "positive": "a red house", "negative_1": "blue house",
         "negative_2": "a mat"}]


def _write(path, text):
  path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
  return str(path)


def test_read_text_pairs_reads_all_three_formats_the_same(tmp_path):
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa

  jsonl = _write(tmp_path / "a.jsonl", "\n".join(json.dumps({**r, "id": i})
                                                 for i, r in enumerate(ROWS)) + "\n")
  cols = list(ROWS[0])
  tsv = _write(tmp_path / "a.tsv", "\r\n".join(["\t".join(cols[::-1])]
                                               + ["\t".join(r[c] for c in cols[::-1])
                                                  for r in ROWS]))
  parquet = str(tmp_path / "a.parquet")
  pq.write_table(pa.Table.from_pylist(ROWS), parquet)
  for path in (jsonl, tsv, parquet):
    pairs = read_text_pairs(path)
    assert pairs.path == path and len(pairs) == 2 and pairs.num_negatives == 2
    assert pairs.anchors == ["the cat", "red house"]
    assert pairs.positives == ["a cat", "a red house"]
    assert pairs.negatives == [["a dog", "a tree"], ["blue house", "a mat"]]
  single = read_text_pairs(_write(tmp_path / "b.jsonl", '\ufeff{"anchor": "x y", "positive": '
                                  '"z", "negative": "w"}\n\n'))  # BOM and blank line
  assert single.negatives == [["w"]] and single.num_negatives == 1
  plain = read_text_pairs(_write(tmp_path / "c.jsonl", '{"anchor": "x", "positive": "y"}\n'))
  assert plain.num_negatives == 0 and plain.negatives == [[]]


@pytest.mark.parametrize("name, content, match", [
    ("latin1.jsonl", b'{"anchor": "a", "positive": "b"}\n{"anchor": "caf\xe9", "positive": "b"}\n',
     r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"),
    ("latin1.tsv", b"anchor\tpositive\ncaf\xe9\tb\n", r"latin1.tsv:2: not UTF-8"),
    ("badjson.jsonl", '{"anchor": "a", "positive": "b"}\n{"anchor": "a",\n',
     r"badjson.jsonl:2: not a JSON object"),
    ("list.jsonl", '["a", "b"]\n', r"list.jsonl:1: expected a JSON object, got list"),
    ("missing.jsonl", '{"anchor": "a", "positive": "b"}\n\n{"anchor": "a"}\n',
     r"missing.jsonl:3: missing column 'positive'"),
    ("missing.tsv", "anchor\tpos\na\tb\n",
     r"missing.tsv:1: the header row \['anchor', 'pos'\] lacks \['positive'\]"),
    ("headless.tsv", "the cat\ta cat\n", r"headless.tsv:1: the header row .* lacks \['anchor', "
     r"'positive'\] \(a TSV file starts with a header row"),
    ("empty.jsonl", '{"anchor": "  ", "positive": "b"}\n',
     r"empty.jsonl:1: column 'anchor' is an empty"),
    ("empty.tsv", "anchor\tpositive\na\t\n", r"empty.tsv:2: column 'positive' is an empty"),
    ("null.jsonl", '{"anchor": "a", "positive": null}\n',
     r"null.jsonl:1: column 'positive' must be a string"),
    ("number.jsonl", '{"anchor": 3, "positive": "b"}\n',
     r"number.jsonl:1: column 'anchor' must be a string"),
    ("fields.tsv", "anchor\tpositive\na\tb\tc\n", r"fields.tsv:2: expected 2 tab-separated fields"),
    ("header.tsv", "anchor\tanchor\n", r"header.tsv:1: the header row must name each column once"),
    ("negcount.jsonl", '{"anchor": "a", "positive": "b", "negative_1": "c", "negative_2": "d"}\n'
     '{"anchor": "a", "positive": "b", "negative_1": "c"}\n',
     r"negcount.jsonl:2: inconsistent negatives: this record has 1 \['negative_1'\], the first "
     r"record \(.*negcount.jsonl:1\) has 2"),
    ("both.jsonl", '{"anchor": "a", "positive": "b", "negative": "c", "negative_1": "d"}\n',
     r"both.jsonl:1: use either 'negative' or 'negative_1..k'"),
    ("gap.tsv", "anchor\tpositive\tnegative_1\tnegative_3\na\tb\tc\td\n",
     r"gap.tsv:2: hard-negative columns must be negative_1..negative_k without gaps"),
    ("blank.jsonl", "\n\n", r"blank.jsonl: no records"),
    ("pairs.csv", "anchor,positive\n", r"pairs.csv: unknown extension '.csv'"),
])
def test_read_text_pairs_errors_name_the_file_and_line(tmp_path, name, content, match):
  path = _write(tmp_path / name, content)
  with pytest.raises(ValueError, match=match):
    read_text_pairs(path)


def test_read_text_pairs_parquet_errors_name_the_row(tmp_path):
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa

  path = str(tmp_path / "a.parquet")
  pq.write_table(pa.Table.from_pylist([{"anchor": "a", "positive": "b"},
                                       {"anchor": None, "positive": "c"}]), path)
  with pytest.raises(ValueError, match=r"a.parquet: row 1: column 'anchor' must be a string"):
    read_text_pairs(path)
  with pytest.raises(ValueError, match=r"a.parquet: no column \['sentence1', 'sentence2'"):
    read_scored_pairs(path)
  with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet file"):
    read_text_pairs(_write(tmp_path / "bad.parquet", b"not parquet at all"))
  with pytest.raises(FileNotFoundError, match="nothere.parquet"):
    read_text_pairs(str(tmp_path / "nothere.parquet"))


def test_non_utf8_and_nan_scores_are_refused_with_the_line(tmp_path):
  good = "sentence1\tsentence2\tscore\na b\tc d\t4.5\n"
  a, b, scores = read_scored_pairs(_write(tmp_path / "ok.tsv", good))
  assert a == ["a b"] and b == ["c d"] and scores.tolist() == [4.5]
  for text, match in [(good + "e\tf\tnan\n", r"bad.tsv:3: score 'nan' is not finite"),
                      (good + "e\tf\tinf\n", r"bad.tsv:3: score 'inf' is not finite"),
                      (good + "e\tf\thigh\n", r"bad.tsv:3: score 'high' is not a number"),
                      (b"sentence1\tsentence2\tscore\n\xff\tb\t1\n", r"bad.tsv:2: not UTF-8"),
                      ("sentence1\tsentence2\ns\tt\n", r"bad.tsv:1: .* lacks \['score'\]")]:
    with pytest.raises(ValueError, match=match):
      read_scored_pairs(_write(tmp_path / "bad.tsv", text))
  for value, match in [("NaN", "NaN is not JSON"), ("null", "not a number"),
                       ("true", "not a number"), ('"4,5"', "not a number")]:
    path = _write(tmp_path / "bad.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                  f'{{"sentence1": "a", "sentence2": "b", "score": {value}}}\n')
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{match}"):
      read_scored_pairs(path)


def test_text_pairs_validates_and_selects():
  pairs = TextPairs(["a", "b", "c"], ["x", "y", "z"], [["n1"], ["n2"], ["n3"]], path="mem")
  sub = pairs.select(np.array([2, 0]))
  assert sub.anchors == ["c", "a"] and sub.negatives == [["n3"], ["n1"]] and sub.path == "mem"
  with pytest.raises(ValueError, match="outside"):
    pairs.select([3])
  with pytest.raises(ValueError, match="2 anchors, 1 positives"):
    TextPairs(["a", "b"], ["x"])
  with pytest.raises(ValueError, match="row 1 has 0 negatives, row 0 has 1"):
    TextPairs(["a", "b"], ["x", "y"], [["n"], []])
  with pytest.raises(ValueError, match="non-empty strings"):
    TextPairs(["a", ""], ["x", "y"])


# --- PairMixture -------------------------------------------------------------------


def _sources():
  make = lambda tag, n, k: TextPairs(
      [f"{tag}a{i}" for i in range(n)], [f"{tag}p{i}" for i in range(n)],
      [[f"{tag}n{i}_{j}" for j in range(k)] for i in range(n)], path=tag)
  return [make("s0", 23, 0), make("s1", 10, 2), make("s2", 8, 0)]


def _sequential_reference(mixture, steps):
  """The documented rule run step by step with per-source counters (no O(1) index arithmetic)."""
  sizes = [len(s) for s in mixture.sources]
  used = [0] * len(sizes)
  out = []
  for step in range(steps):
    block, offset = divmod(step, mixture.block_steps)
    order = np.random.default_rng([mixture.seed, 1, block]).permutation(
        np.repeat(np.arange(len(sizes)), mixture.steps_per_block))
    k = int(order[offset])
    epoch, j = divmod(used[k], sizes[k] // mixture.batch_size)
    perm = np.random.default_rng([mixture.seed, 2, k, epoch]).permutation(sizes[k])
    out.append([(k, int(r)) for r in perm[j * mixture.batch_size:(j + 1) * mixture.batch_size]])
    used[k] += 1
  return out


def test_pair_mixture_is_seekable_and_follows_the_documented_rule():
  mix = PairMixture(_sources(), [0.5, 0.3, 0.2], batch_size=4, seed=7, block_steps=10)
  assert mix.steps_per_block.tolist() == [5, 3, 2]
  want = _sequential_reference(mix, 60)
  fresh = PairMixture(_sources(), [0.5, 0.3, 0.2], batch_size=4, seed=7, block_steps=10)
  for step in [59, 3, 41, 0, 17]:  # any order, a fresh object: the same batch
    assert fresh.batch_indices(step) == want[step]
  assert [mix.batch_indices(s) for s in range(60)] == want
  for block in range(6):  # exact shares per block
    sources = [mix.source_of(s) for s in range(10 * block, 10 * block + 10)]
    assert np.bincount(sources, minlength=3).tolist() == [5, 3, 2]
  for batch in want:  # one source per batch, no repeated row within a batch
    assert len({k for k, _ in batch}) == 1 and len({r for _, r in batch}) == 4
  # Source 1 (10 rows, 2 batches per epoch): each epoch's 8 rows are distinct.
  rows = [[r for _, r in b] for b in want if b[0][0] == 1]
  for e in range(len(rows) // 2):
    assert len(set(rows[2 * e]) | set(rows[2 * e + 1])) == 8
  assert len(mix.batch_indices(10**12)) == 4  # far steps cost O(block + N)
  other = PairMixture(_sources(), [0.5, 0.3, 0.2], batch_size=4, seed=8, block_steps=10)
  assert [other.batch_indices(s) for s in range(20)] != want[:20]


def test_pair_mixture_process_shares_and_defaults():
  mix = PairMixture(_sources(), batch_size=4, seed=0, block_steps=41)  # weights = sizes 23:10:8
  assert mix.steps_per_block.tolist() == [23, 10, 8]
  for step in range(12):
    whole = mix.batch(step)
    k = mix.source_of(step)
    assert whole.path == f"s{k}" and len(whole) == 4
    assert whole.num_negatives == (2 if k == 1 else 0)
    assert whole.anchors == [f"s{k}a{r}" for _, r in mix.batch_indices(step)]
    halves = [mix.batch(step, p, 2) for p in range(2)]
    assert halves[0].anchors + halves[1].anchors == whole.anchors
    assert halves[0].negatives + halves[1].negatives == whole.negatives


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": [1, 1]}, "weights must be 3"),
    ({"weights": [1, np.nan, 1]}, "weights must be 3"),
    ({"weights": [1, -1, 1]}, "weights must be 3"),
    ({"weights": [0, 0, 0]}, "not all 0"),
    ({"weights": ["a", 1, 1]}, "weights must be"),
    ({"weights": [1e6, 1, 1]}, "round to 0 of block_steps"),
    ({"batch_size": 9}, r"batch_size=9 rows; \[\('s2', 8\)\]"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"block_steps": 0}, "block_steps must be"),
])
def test_pair_mixture_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    PairMixture(_sources(), **{"batch_size": 4, **kwargs})


def test_pair_mixture_rejects_bad_steps_and_processes():
  mix = PairMixture(_sources(), batch_size=4)
  for bad in (-1, 1.0, True):
    with pytest.raises(ValueError, match="step must be"):
      mix.batch_indices(bad)
  with pytest.raises(ValueError, match="process_count dividing"):
    mix.batch(0, 0, 3)
  with pytest.raises(ValueError, match="process_count dividing"):
    mix.batch(0, 2, 2)
  with pytest.raises(ValueError, match="non-empty sequence of TextPairs"):
    PairMixture([], batch_size=4)


# --- Buckets --------------------------------------------------------------------


def test_bucket_lengths():
  assert bucket_lengths(512) == (32, 64, 128, 256, 512)
  assert bucket_lengths(300) == (32, 64, 128, 256, 300)
  assert bucket_lengths(32) == (32,) and bucket_lengths(16) == (16,)
  assert bucket_lengths(12, smallest=4) == (4, 8, 12)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="max_length"):
      bucket_lengths(bad)


def test_tokenizer_pads_to_the_smallest_bucket(tokenizer):
  short = tokenizer(["the cat", "a dog"], buckets=(4, 5, 6))
  assert short["input_ids"].shape == (2, 4)  # [CLS] x y [SEP]
  np.testing.assert_array_equal(short["input_ids"][0], [2, 5, 6, 3])
  longer = tokenizer(["the cat sat", "a"], buckets=(4, 5, 6))
  assert longer["input_ids"].shape == (2, 5)
  np.testing.assert_array_equal(longer["attention_mask"], [[1] * 5, [1, 1, 1, 0, 0]])
  assert longer["input_ids"][1, 3:].tolist() == [tokenizer.pad_id] * 2
  capped = tokenizer(["a dog ran on the big mat ."], buckets=(4, 6))  # truncated to 6
  assert capped["input_ids"].shape == (1, 6)
  with pytest.raises(ValueError, match="exceeds every bucket"):
    tokenizer(["a dog ran on the big mat ."], buckets=(4, 5))
  with pytest.raises(ValueError, match="strictly increasing"):
    tokenizer(["a"], buckets=(6, 4))
  with pytest.raises(ValueError, match="not both"):
    tokenizer(["a"], buckets=(6,), pad_to=6)


def test_tokenize_pairs_columns_negatives_and_shared_length(tokenizer):
  pairs = TextPairs(["the cat", "a dog"], ["the cat sat on a mat", "a dog ran"],
                    [["a tree", "red"], ["blue house", "the big dog ran"]])
  out = tokenize_pairs(tokenizer, pairs, buckets=(4, 5, 6))
  assert out["anchor"]["input_ids"].shape == (2, 4)
  assert out["positive"]["input_ids"].shape == (2, 6)
  assert out["negative"]["input_ids"].shape == (2, 2, 6)
  flat = tokenizer(["a tree", "red", "blue house", "the big dog ran"], buckets=(4, 5, 6))
  for key in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(out["negative"][key].reshape(4, 6), flat[key])
  shared = tokenize_pairs(tokenizer, pairs, buckets=(4, 5, 6), shared_length=True)
  assert {v["input_ids"].shape[-1] for v in shared.values()} == {6}
  np.testing.assert_array_equal(shared["anchor"]["input_ids"][:, :4], out["anchor"]["input_ids"])
  assert "negative" not in tokenize_pairs(tokenizer, TextPairs(["a"], ["b"]))
