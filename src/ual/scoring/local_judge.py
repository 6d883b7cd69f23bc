"""A judge with no server: a transformers model reads the judge prompt and we read its score distribution.

Same prompt as the API judge (prompt.py), through the model's chat template,
then the exact probability of every answer "0".."99" followed by the end of
the number:

    P("73") = p("7" | prompt) * p("3" | prompt, "7") * p(not a digit | prompt, "7", "3")

Each candidate is tokenized the way the model would emit it after the
generation prompt (SmolLM2 and Llama split numbers digit by digit, GPT-style
vocabularies may have "73" as one token; both work). The candidates' token
sequences form a trie (for SmolLM2: "0".."9" and the 90 two-digit "10".."99",
100 nodes). All of it is scored in ONE forward pass per sample: the trie's tokens
are appended after the prompt with a tree attention mask (each node sees the
prompt and its own ancestors only) and position ids by depth, so the logits at
every node are exactly those of a separate forward over prompt + that prefix.
That is 100 extra tokens per sample instead of 100 forward passes. A leading-
zero answer ("07") is not a candidate: the canonical spelling is what a
judge writes.

The scores are renormalised over the 100 candidates; `format_mass` records how
much probability the model put on answering with a bare integer at all.
u = E[score] / 99.
"""

from __future__ import annotations

import math
from typing import Sequence

from ual.sample import Sample
from ual.scoring.base import ScoreResult
from ual.scoring.prompt import JudgePrompt, SCORE_MAX, SCORE_MIN, load_prompt


class LocalJudgeScorer:
    def __init__(self, model_name: str, device: str = "auto", batch_size: int = 8,
                 prompt: JudgePrompt | None = None, max_length: int = 2048, model=None, tokenizer=None):
        from ual.models import load_model, load_tokenizer

        self.prompt = prompt or load_prompt(None)
        self.name = f"local_judge:{model_name}:{self.prompt.version}"
        self.tokenizer = tokenizer or load_tokenizer(model_name)
        self.model = (model or load_model(model_name, device=device)).eval()
        self.batch_size, self.max_length = batch_size, max_length
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):  # flash attention ignores a custom 4D mask: the trie would be wrong
            raise ValueError(f"the local judge needs eager or sdpa attention, the model uses {impl!r}")
        self._trie = None  # built from the first prompt (tokenization after the generation prompt)
        self._digit_start = None

    # ------------------------------------------------------------------ public

    def score(self, samples: Sequence[Sample]) -> list[ScoreResult]:
        out: list[ScoreResult] = []
        for i in range(0, len(samples), self.batch_size):
            out.extend(self._score_batch(samples[i:i + self.batch_size]))
        return out

    def distribution(self, sample: Sample) -> list[float]:
        """P(score = k), k = 0..99, renormalised (for inspection and tests)."""
        ids, _ = self._prompt_ids(sample)
        return self._forward([ids])[0][0]

    # ------------------------------------------------------------------ internals

    def _prompt_ids(self, sample: Sample) -> tuple[list[int] | None, int]:
        """Token ids of the rendered prompt, cutting the conversation's middle to fit max_length."""
        budget = self.max_length - 8
        prompt, ids, cut = self.prompt, None, 0
        for _ in range(3):
            msgs, cut = prompt.render(sample.messages)
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget:
                self._ensure_trie(text, ids)
                return ids, cut
            conv_chars = min(prompt.max_chars, sum(len(m["content"]) for m in sample.messages) + 16 * len(sample.messages))
            over = len(ids) - budget
            new_chars = int(conv_chars * max(0.0, 1 - over / max(1, len(ids) - 150)) * 0.9)
            prompt = JudgePrompt(prompt.version, prompt.template, prompt.system, max(0, new_chars))
        return None, cut

    def _ensure_trie(self, text: str, ids: list[int]) -> None:
        if self._trie is not None:
            return
        tok = self.tokenizer
        cands = {}
        for k in range(SCORE_MIN, SCORE_MAX + 1):
            full = tok(text + str(k), add_special_tokens=False)["input_ids"]
            if full[:len(ids)] != ids:  # the number merged with the prompt's last token: tokenize alone
                cands[k] = tok(str(k), add_special_tokens=False)["input_ids"]
            else:
                cands[k] = full[len(ids):]
        nodes, index = [], {}  # node: (parent node or -1, token id, depth); index: prefix tuple -> node
        for seq in cands.values():
            for d in range(1, len(seq) + 1):
                if tuple(seq[:d]) not in index:
                    index[tuple(seq[:d])] = len(nodes)
                    nodes.append((index[tuple(seq[:d - 1])] if d > 1 else -1, seq[d - 1], d))
        self._trie = (cands, nodes, index)
        # tokens that would continue a number: their text starts with a digit ("Ġ4"/"▁4" start with a space)
        self._digit_start = sorted(i for s, i in tok.get_vocab().items() if s[:1].isdigit())

    def _score_batch(self, batch: Sequence[Sample]) -> list[ScoreResult]:
        prepared = [self._prompt_ids(s) for s in batch]
        ok = [i for i, (ids, _) in enumerate(prepared) if ids is not None]
        dists = self._forward([prepared[i][0] for i in ok]) if ok else []
        out = [ScoreResult(s.id, None, {"error": f"prompt longer than {self.max_length} tokens even after cutting",
                                        "judge": self.name}) for s in batch]
        for i, (probs, mass) in zip(ok, dists):
            details = {"judge": self.name, "prompt_version": self.prompt.version, "format_mass": mass}
            if prepared[i][1]:
                details["truncated_chars"] = prepared[i][1]
            if not probs or not math.isfinite(mass) or mass <= 0:
                out[i] = ScoreResult(batch[i].id, None, {**details, "error": "no probability on any score 0-99"})
                continue
            expected = sum(k * p for k, p in enumerate(probs))
            mode = max(range(len(probs)), key=probs.__getitem__)
            out[i] = ScoreResult(batch[i].id, expected / SCORE_MAX, {**details, "score_0_99": expected,
                                                                     "expected": expected, "mode": mode})
        return out

    def _forward(self, prompts: list[list[int]]) -> list[tuple[list[float], float]]:
        """One forward over prompt + trie per row; returns (P(score=k) renormalised, format mass)."""
        import torch

        from ual.batching import pad_id

        cands, nodes, _ = self._trie
        K, dev = len(nodes), next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        T = max(len(p) for p in prompts) + K
        pad = pad_id(self.tokenizer)
        input_ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        position_ids = torch.zeros((len(prompts), T), dtype=torch.long)
        allowed = torch.zeros((len(prompts), T, T), dtype=torch.bool)
        node_tok = torch.tensor([n[1] for n in nodes], dtype=torch.long)
        node_depth = torch.tensor([n[2] for n in nodes], dtype=torch.long)
        tree = torch.eye(K, dtype=torch.bool)  # node j sees its ancestors and itself
        for j, (parent, _, _) in enumerate(nodes):
            if parent >= 0:
                tree[j] |= tree[parent]
        for b, ids in enumerate(prompts):  # left padding: every row ends with the trie
            L, s = len(ids), T - K - len(ids)
            input_ids[b, s:s + L] = torch.tensor(ids)
            input_ids[b, T - K:] = node_tok
            position_ids[b, s:s + L] = torch.arange(L)
            position_ids[b, T - K:] = L - 1 + node_depth
            allowed[b, s:, s:s + L] = torch.ones(L + K, L, dtype=torch.bool).tril()  # prompt causal; trie sees all of it
            allowed[b, T - K:, T - K:] = tree
            allowed[b, torch.arange(s), torch.arange(s)] = True  # padding sees itself only
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        with torch.no_grad():  # logits only where needed: after the prompt and after each trie node
            logits = self.model(input_ids=input_ids.to(dev), attention_mask=mask[:, None].to(dev),
                                position_ids=position_ids.to(dev), use_cache=False, logits_to_keep=K + 1).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B, K + 1, V)
        p_digit = logp[:, :, torch.tensor(self._digit_start, device=logp.device)].exp().sum(-1).clamp(max=1.0)
        log_end = torch.log1p(-p_digit).clamp(min=-1e4)
        # gather every candidate's path: rows[k, d] (which distribution), toks[k, d] (which token)
        index, D = self._trie[2], max(len(seq) for seq in cands.values())
        rows = torch.zeros((len(cands), D), dtype=torch.long)
        toks = torch.zeros((len(cands), D), dtype=torch.long)
        used = torch.zeros((len(cands), D), dtype=torch.bool)
        last = torch.zeros(len(cands), dtype=torch.long)
        for c, seq in enumerate(cands.values()):
            for d, t in enumerate(seq):
                rows[c, d] = index[tuple(seq[:d])] + 1 if d else 0
                toks[c, d], used[c, d] = t, True
            last[c] = index[tuple(seq)] + 1
        rows, toks, used, last = (x.to(logp.device) for x in (rows, toks, used, last))
        out = []
        for b in range(len(prompts)):
            steps = logp[b][rows, toks].masked_fill(~used, 0.0).sum(-1)  # (100,)
            scores = (steps + log_end[b][last]).double()
            z = torch.logsumexp(scores, 0)
            out.append(((scores - z).exp().tolist(), math.exp(z.item())))
        return out


def build_local_judge_scorer(cfg, model_name: str, device: str = "auto") -> LocalJudgeScorer:
    """The `ual score` entry for scorer 'local_judge' (cfg: ScoreConfig; cfg.model overrides model_name).

    The prompt budget is cfg.max_length if set, else 2048 tokens: the judge
    prompt alone is ~250 tokens, so a training budget like 256 would not fit.
    """
    budget = cfg.max_length if cfg.max_length and cfg.max_length >= 512 else 2048
    return LocalJudgeScorer(cfg.model or model_name, device=device, batch_size=cfg.batch_size,
                            prompt=load_prompt(cfg.prompt_file), max_length=budget)
