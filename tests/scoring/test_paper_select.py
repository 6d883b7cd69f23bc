"""`ual select`: DEITA scoring (chat judge and local model), the cosine diversity filter, the command end to end."""

import json

import pytest
import torch

from ual.cli import main
from ual.sample import Sample
from ual.scoring.deita import (ChatJudgeScorer, LocalDeitaScorer, MeanPoolEmbedder, diversity_filter, parse_scale,
                               score_samples, select, turns)

from paper_files import write_sharegpt


def _s(q, a, extra=()):
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q2, a2 in extra:
        msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    return Sample.create("t", msgs)


def test_parse_scale():
    assert [parse_scale(t) for t in ["5", "I'd say 4.", "Complexity: 6", "4.0"]] == [5, 4, 6, 4]
    assert [parse_scale(t) for t in ["7", "0", "3.5", "3 or 4", "", None, "high"]] == [None] * 7
    assert parse_scale("<think>Not a 6, maybe 3 or 4.</think>\n4") == 4  # only the answer after the thinking
    assert parse_scale("<think>Not a 6, maybe 4") is None  # cut while reasoning


def word_count_judge(messages):
    """A simple real scorer: complexity from the query's length, quality from the response's; some garbage."""
    text = messages[-1]["content"]
    if "garbage" in text:
        return "I cannot rate this."
    if "##Complexity" in text:
        q = text.split("##Query:")[1].split("##Complexity")[0]
        return str(min(6, 1 + len(q.split()) // 3))
    r = text.split("#Response#:")[1].split("##Quality")[0]
    return f"Quality: {min(6, 1 + len(r.split()) // 2)}"


def test_chat_judge_scores_per_turn_and_fails_loudly(tmp_path):
    a = _s("short", "one two three four")
    b = _s("a much longer and more complex question here", "ok", extra=[("again", "five six seven eight nine ten")])
    c = _s("garbage please", "whatever")
    judge = ChatJudgeScorer(word_count_judge, concurrency=2, retries=2)
    scores = score_samples([a, b, c], judge, cache_path=tmp_path / "cache.jsonl")
    assert scores[a.id]["complexity"] == [1.0] and scores[a.id]["quality"] == [3.0] and scores[a.id]["score"] == 3.0
    assert len(scores[b.id]["complexity"]) == 2  # every turn: sum of c_t * q_t
    assert scores[b.id]["score"] == 3 * 1 + 1 * 4
    assert scores[c.id]["score"] is None and judge.failures  # never a default
    assert len(turns(b, "first")) == 1
    # Cached: a rerun asks nothing.
    calls = []
    again = score_samples([a, b], ChatJudgeScorer(lambda m: calls.append(m) or "1"), cache_path=tmp_path / "x.jsonl")
    assert calls  # a different cache file: asked
    calls.clear()
    cached = ChatJudgeScorer(lambda m: calls.append(m) or "1", name=judge.name)
    again = score_samples([a, b], cached, cache_path=tmp_path / "cache.jsonl")
    assert not calls and again[b.id]["score"] == scores[b.id]["score"]


def test_local_scorer_is_an_expectation_and_batch_invariant(tiny_model_dir):
    samples = [_s(f"question {i} " * (1 + i), f"answer {i}") for i in range(3)]
    scorer = LocalDeitaScorer(str(tiny_model_dir), batch_size=3, device="cpu")
    c3 = scorer.complexity([t[0] for s in samples for t in turns(s)])
    scorer.batch_size = 1
    c1 = scorer.complexity([t[0] for s in samples for t in turns(s)])
    assert all(1.0 <= x <= 6.0 for x in c3)
    assert c1 == pytest.approx(c3, abs=1e-4)
    q = scorer.quality([turns(s)[0] for s in samples])
    assert all(1.0 <= x <= 6.0 for x in q)


def test_diversity_filter_drops_near_duplicates():
    base = [torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])]
    vecs = {"a": base[0], "a2": base[0] + 0.01 * base[1],  # cos ~0.99995: a duplicate of a
            "b": base[1], "c": base[0] * 0.9 + base[2] * 0.5,  # cos(a, c) = 0.87: kept
            "d": base[2]}
    ordered = [Sample("a", "t", []), Sample("a2", "t", []), Sample("b", "t", []), Sample("c", "t", []), Sample("d", "t", [])]
    embed = lambda batch: torch.stack([vecs[s.id] for s in batch])  # noqa: E731
    kept, stats = diversity_filter(ordered, embed, n=10, threshold=0.95, batch_size=2)
    assert [s.id for s in kept] == ["a", "b", "c", "d"] and stats["dropped_similar"] == 1
    kept, stats = diversity_filter(ordered, embed, n=2, threshold=0.95)
    assert [s.id for s in kept] == ["a", "b"] and stats["considered"] == 3  # stops once n are kept
    kept, _ = diversity_filter(ordered, embed, n=10, threshold=0.8)
    assert [s.id for s in kept] == ["a", "b", "d"]


def test_mean_pool_embedder(tiny_model_dir):
    e = MeanPoolEmbedder(str(tiny_model_dir), device="cpu", batch_size=2)
    samples = [_s("hi", "there"), _s("a longer question " * 5, "and a longer answer " * 4), _s("hi", "there")]
    v = e(samples)
    assert v.shape[0] == 3 and torch.allclose(v.norm(dim=-1), torch.ones(3))
    assert torch.allclose(v[0], v[2], atol=1e-5)  # padding does not change an embedding
    one = MeanPoolEmbedder(str(tiny_model_dir), device="cpu", batch_size=1)(samples[:1])
    assert torch.allclose(one[0], v[0], atol=1e-5)


def test_select_orders_by_score_and_filters():
    samples = [_s("q " * k, "r " * k) for k in range(1, 9)] + [_s("q " * 8, "r " * 8 + "!")]
    judge = ChatJudgeScorer(word_count_judge, concurrency=1)
    # Embeddings from content length: the two longest samples are near-identical.
    embed = lambda b: torch.stack([torch.tensor([1.0, len(s.final_response) / 100.0]) for s in b])  # noqa: E731
    kept, stats = select(samples, judge, embed, n=3, threshold=0.99999)
    scores = [s.meta["deita"]["score"] for s in kept]
    assert scores == sorted(scores, reverse=True) and len(kept) == 3
    assert stats["pool"] == 9 and stats["selected"] == 3


def test_select_command_end_to_end(tmp_path, tiny_model_dir):
    pool = write_sharegpt(tmp_path / "sg.json", n=10)
    out = tmp_path / "sharegpt-6k.jsonl"
    args = ["select", "--source", "sharegpt-v3", "--path", str(pool), "--n", "4", "--out", str(out),
            "--complexity-model", str(tiny_model_dir), "--quality-model", str(tiny_model_dir),
            "--embed-model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "4",
            "--threshold", "0.99999"]  # a random tiny model embeds every sample alike
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all("messages" in r and "deita" in r["meta"] for r in rows)
    s = [r["meta"]["deita"]["score"] for r in rows]
    assert s == sorted(s, reverse=True)
    stats = json.loads((tmp_path / "sharegpt-6k.jsonl.stats.json").read_text())
    assert stats["pool"] == 10 and stats["selected"] == 4
    assert main(args) == 2  # never overwrites without --force
    assert main(args + ["--force"]) == 0
    # The selection is a data source.
    from ual.config import SourceConfig
    from ual.data.sources import load_source

    samples, _ = load_source(SourceConfig(name="sharegpt-6k", path=str(out)))
    assert len(samples) == 4 and samples[0].source == "sharegpt"
