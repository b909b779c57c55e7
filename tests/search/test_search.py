"""mrl_jax.search on a tiny random text bundle: the funnel in Qdrant Edge and in
qdrant-client's local mode returns mrl_jax's own exact adaptive/funnel retrieval,
indexing is idempotent and resumable after kill -9, bad records name file:line."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from testutil import REPO, WORDS, tiny_text_config

import mrl_jax
from mrl_jax import demo, experiments
from mrl_jax.search import SearchError, SearchIndex, layout

pytest.importorskip("qdrant_edge")
pytest.importorskip("qdrant_client")

PLAIN = [w for w in WORDS if not w.startswith("#") and w not in ".,"]
N = 300


def _texts(n: int, seed: int = 0) -> list[str]:
  """``n`` distinct random sentences (distinct, so no two points tie exactly)."""
  rng, out = np.random.default_rng(seed), {}
  while len(out) < n:
    out.setdefault(" ".join(rng.choice(PLAIN, rng.integers(4, 11))), None)
  return list(out)


def _write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _export(out: str, seed: int = 0) -> str:
  config = experiments.validate_config(demo._variant(tiny_text_config(seed=seed)))
  return demo._export_untrained(config, out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("search")
  bundle = _export(str(root / "bundle"))
  texts = _texts(N)
  corpus = _write_jsonl(root / "corpus.jsonl", [{"id": f"doc{i}", "text": t, "tag": i % 3}
                                                for i, t in enumerate(texts)])
  queries = _texts(12, seed=1)
  return {"root": root, "bundle": bundle, "texts": texts, "corpus": corpus, "queries": queries}


def _ids(hits) -> np.ndarray:
  return np.asarray([[int(h.id[3:]) for h in row] for row in hits])


def _assert_same_ranking(hits, ref) -> None:
  """Ids equal the reference's; scores equal its cosines to float32 rounding."""
  np.testing.assert_array_equal(_ids(hits), np.asarray(ref.ids))
  np.testing.assert_allclose([[h.score for h in row] for row in hits], np.asarray(ref.scores),
                             atol=2e-6)


def _reference(index, setup):
  return index.embed_full(setup["queries"]), index.embed_full(setup["texts"])


def test_edge_exact_funnel_equals_adaptive_and_funnel_retrieval(setup):
  root = setup["root"]
  with SearchIndex.create(str(root / "edge2"), encoder=setup["bundle"], stages=(8, 32)) as index:
    out = index.index_corpus(setup["corpus"], progress=False)
    assert out["records"] == N and out["count"] == N
    q, db = _reference(index, setup)
    hits = index.query(setup["queries"], k=10, shortlist=(40,), exact=True)
    _assert_same_ranking(hits, mrl_jax.adaptive_retrieval(
        q, db, shortlist_dim=8, rerank_dim=32, shortlist_k=40, k=10))
    assert hits[0][0].payload["tag"] in (0, 1, 2)  # other columns are the payload
    # HNSW (not exact) over 300 points finds the same top 10 here.
    approx = index.query(setup["queries"], k=10, shortlist=(40,))
    assert np.mean(_ids(approx) == _ids(hits)) > 0.9
  with SearchIndex.create(str(root / "edge3"), encoder=setup["bundle"],
                          stages=(8, 16, 32)) as index:
    index.index_corpus(setup["corpus"], progress=False)
    hits = index.query(setup["queries"], k=5, shortlist=(60, 20), exact=True)
    _assert_same_ranking(hits, mrl_jax.funnel_retrieval(q, db, dims=(8, 16, 32),
                                                        shortlist=(60, 20, 5)))


def test_qdrant_client_local_mode_exact_funnel_equals_adaptive_retrieval(setup):
  with SearchIndex.create(url=":memory:", collection="docs", encoder=setup["bundle"],
                          stages=(8, 32)) as index:
    assert index.index_corpus(setup["corpus"], progress=False)["count"] == N
    q, db = _reference(index, setup)
    with pytest.warns(UserWarning, match="Local mode"):
      hits = index.query(setup["queries"], k=10, shortlist=(40,), exact=True)
    _assert_same_ranking(hits, mrl_jax.adaptive_retrieval(
        q, db, shortlist_dim=8, rerank_dim=32, shortlist_k=40, k=10))


@pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="set QDRANT_URL to a server")
def test_qdrant_server_exact_funnel_equals_adaptive_retrieval(setup):
  name = f"mrl_jax_test_{os.getpid()}_{int(time.time())}"
  index = SearchIndex.create(url=os.environ["QDRANT_URL"], collection=name,
                             encoder=setup["bundle"], stages=(8, 32), precision="int8")
  try:
    assert index.index_corpus(setup["corpus"], progress=False)["count"] == N
    q, db = _reference(index, setup)
    hits = index.query(setup["queries"], k=10, shortlist=(40,), exact=True)
    _assert_same_ranking(hits, mrl_jax.adaptive_retrieval(
        q, db, shortlist_dim=8, rerank_dim=32, shortlist_k=40, k=10))
  finally:
    index.backend.client.delete_collection(name)
    index.close()


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_quantized_stage_zero_rescored_and_exact_ignores_codes(setup, precision):
  path = str(setup["root"] / f"edge_{precision}")
  with SearchIndex.create(path, encoder=setup["bundle"], stages=(8, 32),
                          precision=precision) as index:
    index.index_corpus(setup["corpus"], progress=False)
    q, db = _reference(index, setup)
    ref = mrl_jax.adaptive_retrieval(q, db, shortlist_dim=8, rerank_dim=32, shortlist_k=40,
                                     k=10)
    _assert_same_ranking(index.query(setup["queries"], k=10, shortlist=(40,), exact=True), ref)
    # Quantized HNSW stage 0: the final scores are still the float cosines at 32 dims.
    hits = index.query(setup["queries"], k=10, shortlist=(40,))
    full = np.asarray(mrl_jax.truncate_normalize(db, 32))
    qn = np.asarray(mrl_jax.truncate_normalize(q, 32))
    for row, got in enumerate(hits):
      want = full[[int(h.id[3:]) for h in got]] @ qn[row]
      np.testing.assert_allclose([h.score for h in got], want, atol=2e-6)
  with pytest.raises(SearchError, match="precision"):
    SearchIndex.create(path, encoder=setup["bundle"], stages=(8, 32), precision="float32")


def test_rerun_adds_nothing_and_other_encoder_or_stages_are_refused(setup, tmp_path):
  path = str(tmp_path / "idx")
  corpus = _write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in setup["texts"][:40]])
  with SearchIndex.create(path, encoder=setup["bundle"], stages=(8, 32),
                          batch_size=16) as index:
    index.index_corpus(corpus, progress=False)
  with SearchIndex.create(path, encoder=setup["bundle"], stages=(8, 32),
                          batch_size=16) as index:
    out = index.index_corpus(corpus, progress=False)
    assert out["skipped"] == 40 and out["count"] == 40
    index.manifest["committed"] = None  # forget the marker: the upserts are idempotent
    out = index.index_corpus(corpus, progress=False)
    assert out["skipped"] == 0 and out["count"] == 40
    ids = sorted(p["id"] for p in index.backend.all_payloads())
    assert ids == sorted(str(i) for i in range(40))  # default id: the record number
  with pytest.raises(SearchError, match="stages"):
    SearchIndex.create(path, encoder=setup["bundle"], stages=(16, 32))
  with pytest.raises(SearchError, match="not trained nesting dims"):
    SearchIndex.create(str(tmp_path / "x"), encoder=setup["bundle"], stages=(8, 20))
  other = _export(str(tmp_path / "other"), seed=1)
  with pytest.raises(SearchError, match="encoder bundle"):
    SearchIndex.create(path, encoder=other, stages=(8, 32))
  with pytest.raises(SearchError, match="query it with the encoder that built it"):
    SearchIndex.open(path, encoder=other)


def test_tsv_and_parquet_corpora_give_the_same_points(setup, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = setup["texts"][:20]
  tsv = tmp_path / "c.tsv"
  tsv.write_text("id\ttext\tsource\n" + "".join(f"k{i}\t{t}\ts{i}\n"
                                               for i, t in enumerate(texts)))
  parquet = str(tmp_path / "c.parquet")
  pq.write_table(pa.table({"id": [f"k{i}" for i in range(20)], "text": texts,
                           "source": [f"s{i}" for i in range(20)]}), parquet)
  got = []
  for corpus in (str(tsv), parquet):
    with SearchIndex.create(str(tmp_path / f"idx_{corpus[-3:]}"), encoder=setup["bundle"],
                            stages=(8, 32)) as index:
      index.index_corpus(corpus, progress=False)
      hits = index.query(texts[:3], k=3, shortlist=(10,), exact=True)
      got.append([[(h.id, h.payload["source"], round(h.score, 5)) for h in r] for r in hits])
      assert hits[0][0].id == "k0" and hits[0][0].payload["text"] == texts[0]
  assert got[0] == got[1]


BAD = [
    ({"text": ""}, "an empty 'text' column"),
    ({"text": 3}, "a non-string \\(3\\) 'text' column"),
    ({"title": "x"}, "no 'text' column"),
    ({"text": "dup", "id": "a"}, "duplicate id 'a'"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_records_name_the_line_and_leave_no_half_batch(setup, tmp_path, bad, message):
  rows = [{"text": t, "id": "a" if i == 1 else f"r{i}"} for i, t in
          enumerate(setup["texts"][:5])] + [bad]  # line 6 sits in the second batch of 4
  corpus = _write_jsonl(tmp_path / "bad.jsonl", rows)
  with SearchIndex.create(str(tmp_path / "idx"), encoder=setup["bundle"], stages=(8, 32),
                          batch_size=4) as index:
    with pytest.raises(SearchError, match=f"bad.jsonl:6: .*{message}"):
      index.index_corpus(corpus, progress=False, optimize=False)
    assert index.backend.count() == 4  # the first batch, nothing of the second


def test_non_utf8_and_nan_embeddings_name_the_line(setup, tmp_path):
  corpus = tmp_path / "bytes.jsonl"
  corpus.write_bytes(b'{"text": "the cat"}\n{"text": "a \xff dog"}\n')
  with SearchIndex.create(str(tmp_path / "idx"), encoder=setup["bundle"]) as index:
    with pytest.raises(SearchError, match=r"bytes.jsonl:2: not UTF-8"):
      index.index_corpus(str(corpus), progress=False)
    assert index.backend.count() == 0
    real = index.encoder.embed

    def embed_with_nan(texts, **kwargs):  # a model that breaks on one input
      out = np.array(real(texts, **kwargs))  # a writable copy
      out[[i for i, t in enumerate(texts) if t == "the red house"]] = np.nan
      return out

    index.encoder.embed = embed_with_nan
    good = _write_jsonl(tmp_path / "nan.jsonl", [{"text": "the cat"}, {"text": "the red house"}])
    with pytest.raises(SearchError, match=r"nan.jsonl:2: the encoder produced a NaN"):
      index.index_corpus(good, progress=False)
    assert index.backend.count() == 0


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "mrl_jax.search", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_kill_9_mid_index_then_rerun_has_every_record_once(setup, tmp_path):
  n = 600
  texts = _texts(n, seed=2)
  corpus = _write_jsonl(tmp_path / "big.jsonl", [{"id": f"doc{i}", "text": t}
                                                 for i, t in enumerate(texts)])
  path = tmp_path / "idx"
  args = ["index", f"--encoder={setup['bundle']}", f"--corpus={corpus}", f"--index={path}",
          "--stages=8,32", "--batch_size=16"]
  proc = subprocess.Popen([sys.executable, "-m", "mrl_jax.search", *args], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline, committed = time.time() + 120, 0
  while time.time() < deadline and proc.poll() is None and committed < 48:
    time.sleep(0.05)
    try:
      committed = (json.loads((path / "manifest.json").read_text())["committed"]
                   or {}).get("records", 0)
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
      pass
  assert proc.poll() is None, "indexing finished before it could be killed; raise n"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = _cli(*args)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "already committed" in done.stdout and f"{n} points" in done.stdout, done.stdout
  with SearchIndex.open(str(path)) as index:
    ids = [p["id"] for p in index.backend.all_payloads()]
    assert index.backend.count() == n
  assert sorted(ids) == sorted(f"doc{i}" for i in range(n))


def test_cli_query_evaluate_and_user_errors(setup, tmp_path, capsys):
  from mrl_jax.search.__main__ import main  # in-process: the subprocess path is tested above

  path = str(tmp_path / "idx")
  assert main(["index", f"--encoder={setup['bundle']}", f"--corpus={setup['corpus']}",
               f"--index={path}", "--stages=8,32", "--no_progress"]) == 0
  assert f"{N} points" in capsys.readouterr().out
  queries = _write_jsonl(tmp_path / "q.jsonl", [{"text": setup["texts"][i],
                                                 "positive_id": f"doc{i}"} for i in range(8)])
  out = tmp_path / "out.jsonl"
  assert main(["query", f"--index={path}", f"--queries={queries}", "--k=5", "--shortlist=40",
               "--exact", f"--output={out}"]) == 0
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["ids"][0] for r in lines] == [f"doc{i}" for i in range(8)]  # each finds itself
  assert len(lines[0]["scores"]) == 5 and lines[0]["query"] == setup["texts"][0]
  assert main(["query", f"--index={path}", "--text=the cat sat", "--k=2"]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["query"] == "the cat sat" and len(printed["ids"]) == 2
  assert main(["evaluate", f"--index={path}", f"--queries={queries}", "--shortlist=40"]) == 0
  table = capsys.readouterr().out.splitlines()
  rows = {line.split("  ")[0]: line.split()[-4:] for line in table[1:]}
  exact = rows["funnel d8:40 -> d32:10 exact"]
  assert float(exact[0]) == 1.0 and float(exact[1]) == 1.0  # recall@10, MRR@10: itself first
  for args, message in [
      (["query", f"--index={tmp_path / 'none'}", "--text=x"], "no index there"),
      (["query", f"--index={path}", "--text=x", "--shortlist=40,20"], "give 1 shortlist"),
      (["query", f"--index={path}"], "exactly one of --text"),
      (["index", f"--encoder={setup['bundle']}", f"--corpus={tmp_path / 'no.jsonl'}",
        f"--index={path}"], "no such file"),
      (["index", f"--encoder={tmp_path}", f"--corpus={setup['corpus']}",
        f"--index={tmp_path / 'n'}"], "no exported bundle"),
      (["query", f"--index={path}", "--qdrant_url=http://x", "--text=x"], "exactly one of"),
  ]:
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (args, err)
  proc = _cli("query", f"--index={tmp_path / 'none'}", "--text=x")
  assert proc.returncode == 2 and "no index there" in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_plan_and_layout_checks():
  assert layout.make_plan((64, 384), 10, None, False).limits == (200, 10)
  assert layout.make_plan((32, 64, 384), 10, None, True).limits == (200, 100, 10)
  with pytest.raises(SearchError, match="at least as many"):
    layout.make_plan((8, 32), 10, (5,), False)
  assert layout.check_stages(None, (32, 64, 128, 384)) == (64, 384)
  assert layout.check_stages(None, (8, 16, 32)) == (8, 32)
  with pytest.raises(SearchError, match="strictly increasing"):
    layout.check_stages((32, 8), (8, 16, 32))
  assert layout.point_id("doc1") == layout.point_id("doc1") != layout.point_id("doc2")
  with pytest.raises(SearchError, match="comma-separated"):
    layout.parse_ints("64,x", "--stages")


def test_search_demo_indexes_the_pairs_and_prints_three_queries(setup, tmp_path, capsys):
  from mrl_jax.search.demo import search_demo

  pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
      {"anchor": f"summary {i}", "positive": f"def f{i}():\n  {t}"}
      for i, t in enumerate(setup["texts"][:30])])
  got = search_demo(setup["bundle"], pairs, str(tmp_path / "search"), progress=False)
  printed = capsys.readouterr().out
  assert got["records"] == 30 and len(got["queries"]) == 3
  for q in got["queries"]:
    assert f"query: {q['query']}" in printed and len(q["ids"]) == 3
  assert "def f" in printed  # each hit's first line of text
  again = search_demo(setup["bundle"], pairs, str(tmp_path / "search"), progress=False)
  assert again["index"] == got["index"] and again["queries"] == got["queries"]
