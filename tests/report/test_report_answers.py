"""The report's "Answers side by side": the chosen held-out prompts, every model's answer (escaped, long ones
folded), the sample's u and eps and the gold answer, in Markdown and in the HTML page."""

import json
import re

import pytest

from ual.config import load_config
from ual.evaluation import answers
from ual.io import read_json, write_json, write_jsonl
from ual.report.answers import FOLD_CHARS, eps_of_score
from ual.report.stage import run_report
from ual.sample import Sample


def _heldout():
    chat = [Sample.create("chat", [{"role": "user", "content": f"Say something kind #{i}"},
                                   {"role": "assistant", "content": f"You matter #{i}."}]) for i in range(5)]
    maths = [Sample.create("gsm8k", [{"role": "user", "content": f"What is {i} + 2?"},
                                     {"role": "assistant", "content": f"{i} + 2 = {i + 2}\n#### {i + 2}"}],
                           {"answer": str(i + 2)}) for i in range(4)]
    return [s for pair in zip(chat, maths) for s in pair] + chat[4:]


def test_the_prompts_are_a_seeded_draw_per_source():
    heldout = _heldout()
    chosen = answers.side_by_side_samples(heldout, 2)
    assert [s.source for s in chosen] == ["chat", "chat", "gsm8k", "gsm8k"]
    assert chosen == answers.side_by_side_samples(heldout, 2)  # the same draw every time
    # a source's draw depends on its own samples only, not on the other sources
    alone = answers.side_by_side_samples([s for s in heldout if s.source == "gsm8k"], 2)
    assert [s.id for s in alone] == [s.id for s in chosen if s.source == "gsm8k"]
    by_source = [s for s in heldout if s.source == "chat"]
    assert [by_source.index(s) for s in chosen[:2]] == sorted(by_source.index(s) for s in chosen[:2])
    assert len(answers.side_by_side_samples(heldout, 9)) == 9  # a source smaller than asked: all of it
    # the pairwise prompts are added once: a model the judge compares answers each prompt once
    union = answers.answered_samples(chosen, by_source[:3])
    assert len({s.id for s in union}) == len(union) and {s.id for s in by_source[:3]} <= {s.id for s in union}


def _run_folder(tmp_path, heldout, chosen):
    run = tmp_path / "run"
    write_jsonl(run / "heldout.jsonl", [s.to_dict() for s in heldout])
    write_jsonl(run / "heldout_scores.jsonl", [{"id": s.id, "source": s.source, "scorer": "entropy_ratio",
                                                "score": 0.9 if s.source == "chat" else 0.2} for s in heldout])
    write_jsonl(run / "smoothing.jsonl", [{"id": f"t{i}", "source": "x", "score": i / 10, "eps": i / 50}
                                          for i in range(11)])
    long = "Long answer with <b>markup</b> | and a pipe.\n\n# Not a heading\n" * 20
    for model, text in [("base", "Short <script>alert(1)</script> answer; #### 4"), ("ual", long)]:
        write_json(run / "eval" / "answers" / f"{model}.json",
                   [{"instruction": s.prompt_messages[-1]["content"], "output": text, "generator": model,
                     "dataset": s.source, "id": s.id} for s in chosen])
    answers.record_selection(run / "eval" / "answers" / "side_by_side.json", chosen, 2)
    answers.record_selection(run / "eval" / "answers" / "side_by_side.json", chosen, 2, "base", 4, 12.5)
    return run, long


def test_answers_side_by_side_in_markdown_and_html(tmp_path):
    heldout = _heldout()
    chosen = answers.side_by_side_samples(heldout, 2)
    run, long = _run_folder(tmp_path, heldout, chosen)
    text = run_report(load_config(None, {"run_dir": str(run), "name": "r"}))
    section = text[text.index("## Answers side by side"):]
    assert 'random.Random("ual-answers-v1:SOURCE").sample' in section  # the rule, written beside the prompts
    assert "base 12.5 s (4 prompts)" in section
    for s in chosen:
        assert f"`{s.id}`" in section
    # u and the eps the map gives it (0.9 -> 0.18 between the training (score, eps) pairs); the gold answer
    assert section.count("u = 0.900 (entropy_ratio); eps = 0.180") == 2
    assert section.count("u = 0.200 (entropy_ratio); eps = 0.040; gold answer **") == 2
    gold = chosen[2].meta["answer"]
    assert f"final answer 4: {'right' if gold == '4' else 'wrong'}" in section
    # model text is escaped, short answers open, long ones folded
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section and "<script>" not in section
    assert len(long) > FOLD_CHARS and section.count("<details><summary><b>ual</b>") == 4
    assert section.count("<details open><summary><b>base</b>") == 4
    html = (run / "report.html").read_text()
    assert html.count("<details") == section.count("<details") and "<script>alert" not in html
    # neither HTML, a table nor a heading from the answer's text; its blank lines kept inside the <pre>
    assert "&lt;b&gt;markup&lt;/b&gt; | and a pipe.&#10;&#10;# Not a heading" in html and "<h1>Not a" not in html
    metrics = read_json(run / "metrics.json")["answers"]
    assert [p["id"] for p in metrics["prompts"]] == [s.id for s in chosen]


def test_eps_of_a_held_out_score_is_read_off_the_map():
    to_eps = eps_of_score([{"score": 0.0, "eps": 0.0}, {"score": 0.5, "eps": 0.1}, {"score": 1.0, "eps": 0.3},
                           {"score": None, "eps": 0.1}])
    assert to_eps(0.25) == pytest.approx(0.05) and to_eps(0.75) == pytest.approx(0.2) and to_eps(2.0) == 0.3
    assert eps_of_score([{"score": None, "eps": 0.1}]) is None


def test_answers_for_names_the_missing_prompt(tmp_path):
    path = tmp_path / "ual.json"
    path.write_text(json.dumps([{"instruction": "q", "output": "a", "generator": "g", "id": "abc"}]))
    assert answers.answers_for(path, ["abc"])[0]["output"] == "a"
    with pytest.raises(ValueError, match=re.escape(f"{path}: no answer to held-out sample(s) zzz")):
        answers.answers_for(path, ["abc", "zzz"])
