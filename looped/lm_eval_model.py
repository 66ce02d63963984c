"""lm-evaluation-harness scoring any looped run through looped's own forward: GQA, MLA,
cross-layer baselines, any loop count (`looped export` covers GQA only).

    looped lm-eval run=runs/text tasks=hellaswag batch_size=16 device=cuda
    lm_eval --model looped --model_args run=runs/text,loops=8 --tasks ...   # after import looped.lm_eval_model

Requests are scored as the exported model scores them under lm-eval's `hf` model: token 0 (the
byte tokenizer's NUL, the exported tokenizer's BOS) is the prefix of an empty context and of
rolling windows, and contexts longer than model.max_seq_len keep their last tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from looped.errors import ConfigError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # the class below needs lm-eval; importing this module names the fix
    raise ConfigError("looped lm-eval needs lm-evaluation-harness: pip install "
                      "'looped[lm-eval]'") from None

PREFIX_TOKEN = 0  # what an empty context starts from (the exported tokenizer's BOS)


@register_model("looped")
class LoopedEvalLM(LM):
    def __init__(self, run: str, batch_size: int | str = 8, device: str = "auto",
                 loops: Optional[int] = None, **_):
        super().__init__()
        from looped import load_run
        from looped.data import build_task
        from looped.training.device import pick_device

        self.cfg, model = load_run(run)
        self.device_ = pick_device(device)
        self.model = model.to(self.device_).eval()
        self.loops = int(loops) if loops else self.cfg.loop
        if not self.model.supports_loops(self.loops):
            raise ConfigError(f"this run cannot run loops={self.loops}")
        self.tokenizer = getattr(build_task(self.cfg.task, split="eval"), "tokenizer", None)
        if self.tokenizer is None:
            raise ConfigError(f"run {run}: task '{self.cfg.task.name}' has no text tokenizer; "
                              f"lm-eval scores text models (task=text)")
        self.batch_size = int(batch_size)
        self.max_len = self.cfg.model.max_seq_len

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)] if text else []

    # -- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, pieces: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each continuation given its context, in batches of
        similar length; the hidden states of the continuation only go through the head."""
        from looped.training.device import autocast

        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]) - len(pieces[i][1]))
        out: list[Optional[tuple[float, bool]]] = [None] * len(pieces)
        for lo in range(0, len(order), self.batch_size):
            rows = []
            for i in order[lo:lo + self.batch_size]:
                context, continuation = pieces[i]
                tokens = (context or [PREFIX_TOKEN]) + continuation
                tokens = tokens[-(self.max_len + 1):]  # the longest window the model takes
                rows.append((i, tokens, len(continuation)))
            width = max(len(t) - 1 for _, t, _ in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, (_, tokens, _) in enumerate(rows):
                ids[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            with autocast(self.device_):
                hidden = self.model(ids.to(self.device_), loops=self.loops, logits=False).hidden
                for r, (i, tokens, n) in enumerate(rows):
                    end = len(tokens) - 1  # causal: right padding does not reach these rows
                    logp = F.log_softmax(self.model.head(hidden[r, end - n:end]).double(), -1)
                    target = torch.tensor(tokens[-n:], device=logp.device)
                    ll = float(logp.gather(1, target[:, None]).sum())
                    out[i] = (ll, bool((logp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([(self.encode(r.args[0]), self.encode(r.args[1])) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """The whole string's log-likelihood: windows of max_seq_len targets, each with as much
        of the preceding text as fits (the first token predicted from the prefix token)."""
        results = []
        for r in requests:
            tokens = [PREFIX_TOKEN] + self.encode(r.args[0])
            pieces = []
            for a in range(1, len(tokens), self.max_len):
                b = min(a + self.max_len, len(tokens))
                start = max(0, b - 1 - self.max_len)
                pieces.append((tokens[start:a], tokens[a:b]))
            results.append(sum(ll for ll, _ in self._score(pieces)))
        return results

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        results = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = (self.encode(context) or [PREFIX_TOKEN])[-(self.max_len - 1):]
            max_new = min(max_new, self.max_len - len(ids))
            prompt = torch.tensor([ids], device=self.device_)
            new = self.model.generate(prompt, max_new, temperature=0, loops=self.loops)
            text = self.tokenizer.decode(new[0, len(ids):].tolist())
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results
