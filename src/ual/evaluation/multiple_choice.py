"""Four-choice (or k-choice) questions scored by log-likelihood, the OpenLLM way.

Each question is shown as

    {question}
    A. {choice 1}
    B. {choice 2}
    ...
    Answer:

and the model's prediction is the letter whose continuation (" A", " B", ...)
has the highest log-likelihood (`accuracy`). `acc_norm` scores each choice's
own text after "Question: {question}\\nAnswer:" by its log-likelihood divided by
its length in characters, as lm-evaluation-harness does.

The paper's "Best-of-N" was pass@N: N answer letters sampled from the model, a
hit when any of them is right. That is not accuracy (a uniform guesser over
four choices scores 1 - 0.75^4 = 68% at N=4), so it is reported as `pass@N`,
beside its chance level, from N letters drawn at the given temperature from
the model's next-token distribution after the prompt (a draw that is not a
choice letter is a miss), together with its exact expectation
1 - (1 - p_correct)^N.

Data: `load_packaged_mc` reads the 1,000 MMLU questions shipped inside the
`evals` package (evals/registry/data/sandbagging/samples-all-large.jsonl,
"question" with the choices embedded, "answer" a letter); `load_mc_file` reads
local JSONL/JSON files with "question", "choices" (list) and "answer" (index or
letter). `shuffle_choices` reorders choices deterministically (TruthfulQA's
correct choice always came first in the paper's code); the evaluation stage and
the lm-eval path apply it unless `eval.mc_shuffle: false`, and `position_stats`
reports accuracy per gold position and the predicted positions, so a position
bias is visible.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

LETTERS = "ABCDEFGHIJ"
MC_SHUFFLE_SEED = 0  # one order per question (by its id), the same for every model, run and training seed
PACKAGED_MC = "registry/data/sandbagging/samples-all-large.jsonl"


@dataclass
class MCQuestion:
    id: str
    question: str
    choices: list[str]
    answer: int  # index into choices
    meta: dict = field(default_factory=dict)


def packaged_mc_path() -> Path:
    spec = importlib.util.find_spec("evals")  # finds the folder without importing evals' dependencies
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the packaged multiple-choice set needs the `evals` package: pip install --no-deps evals")
    path = Path(spec.submodule_search_locations[0]) / PACKAGED_MC
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed `evals` package")
    return path


_EMBEDDED = re.compile(r"^(?P<stem>.*?)\n+A\. (?P<A>.*?)\nB\. (?P<B>.*?)\nC\. (?P<C>.*?)\nD\. (?P<D>.*?)\nAnswer:\s*$", re.S)


def load_packaged_mc(limit: int | None = None) -> list[MCQuestion]:
    """The 1,000 four-choice MMLU questions that ship in `evals` (first `limit` of them)."""
    path = packaged_mc_path()
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(out) >= limit:
                break
            row = json.loads(line)
            m = _EMBEDDED.match(row["question"])
            if m is None or row.get("answer") not in tuple("ABCD"):
                raise ValueError(f"{path}:{lineno}: not a four-choice question with an A-D answer")
            out.append(
                MCQuestion(
                    id=f"mmlu-evals-{lineno}",
                    question=m["stem"].strip(),
                    choices=[m[x].strip() for x in "ABCD"],
                    answer="ABCD".index(row["answer"]),
                    meta={"origin": f"{path.name}:{lineno}", **({"topic": row["topic"]} if "topic" in row else {})},
                )
            )
    return out


def _answer_index(value, choices: list[str], where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: field 'answer': expected an index or a letter, got {value!r}")
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    else:
        raise ValueError(f"{where}: field 'answer': expected an index or a letter, got {value!r}")
    if not 0 <= idx < len(choices):
        raise ValueError(f"{where}: field 'answer': {value!r} is out of range for {len(choices)} choices")
    return idx


def load_mc_file(path: str | Path) -> list[MCQuestion]:
    """Questions from a JSONL file (or a JSON list): {"question", "choices": [...], "answer": 0 | "A"}."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = list(enumerate(json.loads(text), 1))
        unit = "item"
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        unit = "line"
    out = []
    for n, row in rows:
        where = f"{path}:{n}" if unit == "line" else f"{path}: item {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with question/choices/answer")
        for key in ("question", "choices", "answer"):
            if key not in row:
                raise ValueError(f"{where}: missing field '{key}'")
        q, choices = row["question"], row["choices"]
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}: field 'question': expected a non-empty string")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{where}: field 'choices': expected a list of 2 to {len(LETTERS)} strings")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f"{where}: field 'choices': every choice must be a non-empty string")
        idx = _answer_index(row["answer"], choices, where)
        qid = str(row.get("id", f"{path.stem}-{n}"))
        out.append(MCQuestion(qid, q.strip(), [c.strip() for c in choices], idx, {"origin": f"{path.name}:{n}"}))
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def shuffle_choices(questions: list[MCQuestion], seed: int = 0) -> list[MCQuestion]:
    """Each question's choices in a seeded order that depends only on (seed, question id)."""
    out = []
    for q in questions:
        order = list(range(len(q.choices)))
        random.Random(f"{seed}:{q.id}").shuffle(order)
        out.append(replace(q, choices=[q.choices[i] for i in order], answer=order.index(q.answer)))
    return out


def load_questions(spec, shuffle: bool = False) -> list[MCQuestion]:
    """The questions of `spec` (a list of MCQuestion, "packaged", or an MC file), with their choices in
    the seeded order when `shuffle` (eval.mc_shuffle): the same for the built-in evaluation and lm-eval."""
    if isinstance(spec, list):
        questions = spec
    elif str(spec) == "packaged":
        questions = load_packaged_mc()
    else:
        questions = load_mc_file(spec)
    return shuffle_choices(questions, seed=MC_SHUFFLE_SEED) if shuffle else questions


def position_stats(gold: list[int], pred: list[int], n_positions: int) -> dict:
    """Where the right answers sit and where the model answers: counts per position (letter) of the gold
    answers and of the predictions, and accuracy per gold position. A model that always answers "A"
    scores 1 on gold A and 0 elsewhere, so a position bias shows even when overall accuracy looks fine."""
    letters = LETTERS[:n_positions]
    hits = {x: [p == g for g, p in zip(gold, pred) if g == i] for i, x in enumerate(letters)}
    return {"gold": {x: len(h) for x, h in hits.items()},
            "pred": {x: sum(p == i for p in pred) for i, x in enumerate(letters)},
            "accuracy_by_gold": {x: sum(h) / len(h) if h else None for x, h in hits.items()}}


def letter_prompt(q: MCQuestion) -> str:
    lines = [q.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def _context(tokenizer, text: str, chat: bool) -> str:
    if not chat:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8, progress: bool = False):
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair.

    Context and continuation are tokenised separately and concatenated (as
    lm-evaluation-harness does), so the continuation's tokens are exactly those
    of the continuation text. Right padding keeps positions 0..len-1.
    """
    import torch

    from ual.batching import inference_batches, pad_batch, pad_id

    enc = []
    for ctx, cont in pairs:
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        k = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not c or not k:
            raise ValueError(f"an empty context or continuation cannot be scored: {(ctx[:40], cont[:40])!r}")
        enc.append((c, k))
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i][0]) + len(enc[i][1])))
    results: list = [None] * len(enc)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    for batch in inference_batches(model, order, batch_size, "loglik", progress):
        # right padding: positions stay 0..len-1
        ids, mask = pad_batch([enc[i][0] + enc[i][1] for i in batch], pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, i in enumerate(batch):
            c, k = enc[i]
            # log-probs only where needed: the positions that predict the continuation
            logp = logits[r, len(c) - 1 : len(c) - 1 + len(k)].float().log_softmax(-1)
            results[i] = logp.gather(-1, torch.tensor(k, device=device).view(-1, 1)).sum().item()
    return results


def next_token_logprobs(model, tokenizer, contexts: list[str], batch_size: int = 8, progress: bool = False):
    """log p(next token | context) over the vocabulary, one (V,) tensor per context.

    Left padding with explicit position ids, and only the last position's
    logits are computed (`logits_to_keep=1`): the output projection is a fifth
    of a small model's work per token.
    """
    from ual.batching import inference_batches, pad_batch, pad_id, positions

    enc = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in contexts]
    if any(not e for e in enc):
        raise ValueError("an empty context cannot be scored")
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out: list = [None] * len(enc)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    for batch in inference_batches(model, order, batch_size, "next-token", progress):
        ids, mask = pad_batch([enc[i] for i in batch], pad, side="left")
        kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions(mask).to(device))
        try:
            logits = model(**kwargs, logits_to_keep=1).logits[:, -1]
        except TypeError:
            logits = model(**kwargs).logits[:, -1]
        logp = logits.float().log_softmax(-1).cpu()
        for r, i in enumerate(batch):
            out[i] = logp[r]
    return out


_LETTER_IDS: dict[tuple, dict[str, list[int]]] = {}


def _letter_tokens(tokenizer, n_choices: int) -> dict[int, list[int]]:
    """For each choice index, every vocabulary id that decodes (stripped) to its letter."""
    key = (tokenizer.name_or_path, len(tokenizer))
    if key not in _LETTER_IDS:  # decoding the whole vocabulary takes a few seconds: once
        table: dict[str, list[int]] = {x: [] for x in LETTERS}
        for tid, text in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))])):
            if text.strip() in table:
                table[text.strip()].append(tid)
        _LETTER_IDS[key] = table
    return {i: _LETTER_IDS[key][LETTERS[i]] for i in range(n_choices)}


def evaluate_multiple_choice(
    model,
    tokenizer,
    questions: list[MCQuestion],
    batch_size: int = 8,
    n_samples: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
    acc_norm: bool = True,
    chat: bool = False,
    progress: bool = True,
) -> dict:
    """accuracy (letter log-likelihood), acc_norm (length-normalised choice text), pass@N (sampled letters)."""
    import torch

    if not questions:
        raise ValueError("no questions to evaluate")
    letter_space = "" if chat else " "
    contexts = [_context(tokenizer, letter_prompt(q), chat) for q in questions]
    # One forward pass per question gives the next-token distribution after "Answer:";
    # a letter continuation that is one token is read from it, others are scored in full.
    next_logps = next_token_logprobs(model, tokenizer, contexts, batch_size, progress)
    cont_ids = {i: tokenizer(letter_space + LETTERS[i], add_special_tokens=False)["input_ids"] for i in range(len(LETTERS))}
    multi = [(qi, i) for qi, q in enumerate(questions) for i in range(len(q.choices)) if len(cont_ids[i]) != 1]
    multi_ll = dict(zip(multi, loglikelihoods(
        model, tokenizer, [(contexts[qi], letter_space + LETTERS[i]) for qi, i in multi], batch_size)))
    letter_ids = {k: _letter_tokens(tokenizer, k) for k in {len(q.choices) for q in questions}}
    gen = torch.Generator().manual_seed(seed)
    records = []
    for qi, q in enumerate(questions):
        k = len(q.choices)
        next_logp = next_logps[qi]
        lls = [multi_ll[(qi, i)] if (qi, i) in multi_ll else float(next_logp[cont_ids[i][0]]) for i in range(k)]
        probs = torch.softmax(next_logp / temperature, -1)
        draws = torch.multinomial(probs, n_samples, replacement=True, generator=gen).tolist() if n_samples else []
        drawn = [next((i for i, ids in letter_ids[k].items() if t in ids), None) for t in draws]
        p_correct = float(probs[letter_ids[k][q.answer]].sum()) if letter_ids[k][q.answer] else 0.0
        pred = max(range(k), key=lambda i: lls[i])
        # The model's answer distribution over the k choices (its letters' likelihoods, renormalised):
        # p(gold) is a graded score where accuracy is all-or-nothing, and max p is the confidence
        # that multiple-choice calibration (ECE) checks against correctness.
        choice_p = torch.softmax(torch.tensor(lls, dtype=torch.float64), 0).tolist()
        records.append(
            {"id": q.id, "answer": LETTERS[q.answer], "pred": LETTERS[pred], "correct": pred == q.answer,
             "loglik": lls, "choice_probs": choice_p, "p_gold": choice_p[q.answer], "confidence": max(choice_p),
             "sampled": [LETTERS[d] if d is not None else None for d in drawn],
             "pass": any(d == q.answer for d in drawn), "p_correct_letter": p_correct}
        )
    if acc_norm:
        norm_pairs = [(_context(tokenizer, f"Question: {q.question}\nAnswer:", chat), letter_space + c)
                      for q in questions for c in q.choices]
        norm_ll = loglikelihoods(model, tokenizer, norm_pairs, batch_size, progress)
        pos = 0
        for q, rec in zip(questions, records):
            scores = [norm_ll[pos + i] / max(1, len(c)) for i, c in enumerate(q.choices)]
            pos += len(q.choices)
            best = max(range(len(scores)), key=lambda i: scores[i])
            rec.update({"pred_norm": LETTERS[best], "correct_norm": best == q.answer})
    n = len(records)
    chance = sum(1 / len(q.choices) for q in questions) / n
    result = {
        "n_questions": n,
        "accuracy": sum(r["correct"] for r in records) / n,
        "p_gold": sum(r["p_gold"] for r in records) / n,
        "answer_letters": {x: sum(r["pred"] == x for r in records) for x in LETTERS[: max(len(q.choices) for q in questions)]},
        "positions": position_stats([q.answer for q in questions], [LETTERS.index(r["pred"]) for r in records],
                                    max(len(q.choices) for q in questions)),
        "acc_norm": sum(r["correct_norm"] for r in records) / n if acc_norm else None,
        f"pass@{n_samples}": sum(r["pass"] for r in records) / n if n_samples else None,
        "pass_at_n": sum(r["pass"] for r in records) / n if n_samples else None,
        "expected_pass_at_n": (sum(1 - (1 - r["p_correct_letter"]) ** n_samples for r in records) / n
                               if n_samples else None),
        "n_samples": n_samples,
        "temperature": temperature,
        "chance_accuracy": chance,
        "chance_pass_at_n": (sum(1 - (1 - 1 / len(q.choices)) ** n_samples for q in questions) / n
                             if n_samples else None),
        "format": "chat" if chat else "plain",
        "note": "pass@N (the paper's 'Best-of-N') counts a hit when any of N sampled letters is right; it is not accuracy",
        "records": records,
    }
    return result
