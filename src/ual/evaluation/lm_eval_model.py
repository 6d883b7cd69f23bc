"""lm-eval's Hugging Face backend with ual's shared-context log-likelihoods.

`SharedContextHFLM` is lm-eval's own `HFLM` (its tokenisation of each (context,
continuation) pair, its left truncation, its generation and rolling paths) with one
method replaced: `_loglikelihood_tokens`, which scores every request that shares a
context in one row (loglik.py) instead of one row per request. Tasks, prompts and
metrics stay lm-eval's; only the forward passes are fewer and shorter.
"""

from __future__ import annotations

from lm_eval.models.huggingface import HFLM

from ual.batching import pad_id
from ual.evaluation.loglik import shared_context_loglikelihoods


class SharedContextHFLM(HFLM):
    """HFLM whose loglikelihood requests share their context's forward pass.

    batch_tokens: rows x longest row per forward (the tree rows of several questions)."""

    def __init__(self, *args, batch_tokens: int = 4096, progress: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_tokens, self.progress = batch_tokens, progress

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        pairs = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens cannot be scored "
                                 f"(1 to {self.max_length})")
            # lm-eval's left truncation: the last max_length + 1 tokens of context + continuation
            whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            pairs.append((whole[: len(whole) - len(continuation_enc)], list(continuation_enc)))
        results = shared_context_loglikelihoods(self.model, pairs, pad_id(self.tokenizer, self.eot_token_id),
                                                batch_tokens=self.batch_tokens,
                                                progress=self.progress and not disable_tqdm)
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results
