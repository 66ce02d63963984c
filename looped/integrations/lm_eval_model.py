"""lm-evaluation-harness scoring any looped run through looped's own forward: GQA, MLA,
cross-layer baselines, adaptive exit, a `last` KV cache, any loop count (`looped export`
covers plain GQA only).

    looped lm-eval run=runs/text tasks=hellaswag batch_size=16 device=cuda

    import lm_eval, looped.integrations.lm_eval_model          # the import registers the model "looped"
    lm_eval.simple_evaluate(model="looped", model_args="run=runs/text,loops=16", tasks=[...])

Requests are tokenized and cut as lm-eval's `hf` model treats the exported model: the run's
own tokenizer (the one `looped export` writes), a context's trailing spaces moved into the
continuation, token 0 (the byte tokenizer's NUL, the exported tokenizer's BOS) before an empty
context and the first rolling window, contexts longer than model.max_seq_len cut from the left,
texts longer than it scored in disjoint windows, generation stopped at the first stop string.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F

from looped.errors import ConfigError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # importing this module is how a user meets the missing extra
    raise ConfigError("looped lm-eval needs lm-evaluation-harness: "
                      "pip install 'looped[lm-eval]'") from None

PREFIX_TOKEN = 0  # what an empty context starts from (the exported tokenizer's BOS and EOS)
STOP = "\x00"  # the exported byte tokenizer's EOS as text, a stop string `hf` always adds


@register_model("looped")
class LoopedEvalLM(TemplateLM):
    """A trained run as an lm-eval model. batch_size: requests per forward (0 or "auto": as
    many as fit in memory); loops: the core's iterations (default: the run's trained loop);
    exit, threshold: an adaptive-exit criterion and its threshold (default: the run's own);
    kv: score every token through a KV cache of this policy (per_iteration | last), one at a
    time, and decode through it (default: one full forward per batch, a per_iteration cache)."""

    def __init__(self, run: str, batch_size: int | str = 8, device: str = "auto",
                 loops: Optional[int] = None, exit: Optional[str] = None,
                 threshold: Optional[float] = None, kv: Optional[str] = None,
                 max_batch_size: Optional[int] = None):  # lm-eval passes it; unused
        super().__init__()
        from looped import load_run
        from looped.data import build_task
        from looped.model.cache_policy import CACHE_POLICIES
        from looped.model.exit import build_exit
        from looped.training.device import pick_device
        from looped.training.scoring import eval_batch_size

        overrides = [f"exit.criterion={exit}"] if exit is not None else []
        overrides += [f"exit.threshold={threshold}"] if threshold is not None else []
        self.cfg, model = load_run(str(run), overrides)
        self._device = pick_device(device)  # lm-eval's LM.device reads it
        self.model = model.to(self.device).eval()
        self.loops = self.model._check_loops(int(loops) if loops is not None else None)
        self.exit = build_exit(self.cfg.exit)
        if kv is not None:
            CACHE_POLICIES.lookup(kv)
        self.kv = kv
        # the tokenizer `looped export` writes: the task's own, loaded (a BPE from its cache)
        self.tokenizer = getattr(build_task(self.cfg.task, split="eval"), "tokenizer", None)
        if self.tokenizer is None:
            raise ConfigError(f"run {run}: task '{self.cfg.task.name}' has no text tokenizer; "
                              f"lm-eval scores text models (task=text)")
        self.max_length = self.cfg.model.max_seq_len
        if str(batch_size).startswith("auto") or str(batch_size) == "0":
            batch_size = eval_batch_size(self.model, self.max_length, self.loops, self.device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (0 or auto: what fits in memory), got "
                              f"{batch_size}")

    # -- tokens --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return PREFIX_TOKEN

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> list[int]:
        # looped's tokenizers add no special tokens: add_special_tokens changes nothing
        return self.tokenizer.encode(string).tolist() if string else []

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (key, context tokens, continuation tokens), in
        batches of similar length, longest first."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens is longer than "
                                  f"model.max_seq_len={self.max_length}")
            rows.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for lo in range(0, len(order), self.batch_size):
            batch = order[lo:lo + self.batch_size]
            for i, answer in zip(batch, self._score_batch([rows[i] for i in batch])):
                out[i] = answer
                if requests[i][0] is not None:  # a rolling window has no request of its own
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Rows of (tokens, n): the log-likelihood of each row's last n tokens given the ones
        before. Rows are right-padded: causal attention keeps padding out of earlier tokens."""
        from looped.training.device import autocast

        ids = torch.zeros(len(rows), max(len(t) for t, _ in rows) - 1, dtype=torch.long)
        for r, (tokens, _) in enumerate(rows):
            ids[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        ids = ids.to(self.device)
        out = []
        with autocast(self.device):
            if self.kv is None:  # the head only on the positions that predict continuations
                hidden = self.model(ids, loops=self.loops, exit=self.exit, logits=False).hidden
                head = self.model.head
            else:
                hidden = self.model.cached_forward(ids, kv=self.kv, loops=self.loops,
                                                   exit=self.exit).logits
                head = lambda logits: logits  # noqa: E731
            for r, (tokens, n) in enumerate(rows):
                end = len(tokens) - 1
                logp = F.log_softmax(head(hidden[r, end - n:end]).double(), -1)
                target = torch.tensor(tokens[-n:], device=logp.device)
                out.append((float(logp.gather(1, target[:, None]).sum()),
                            bool((logp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood: disjoint windows of max_seq_len predicted tokens, each
        read after as much of the text before it as fits; all texts' windows batched."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            for window in get_rolling_token_windows(
                    token_list=self.tok_encode(request.args[0]), prefix_token=PREFIX_TOKEN,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, up to max_gen_toks tokens and cut
        at the first stop string. Requests of one prompt length and the same generation
        arguments decode together (the forward takes no padding mask)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        prompts = []
        for i, request in enumerate(requests):
            kwargs = normalize_gen_kwargs(dict(request.args[1]))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=STOP)
            max_new = min(kwargs.pop("max_gen_toks"), self.max_length - 1)
            ids = (self.tok_encode(request.args[0]) or [PREFIX_TOKEN])
            prompts.append(ids[-(self.max_length - max_new):])  # room for max_new tokens
            # normalize_gen_kwargs decides do_sample; without it lm-eval's hf model is greedy
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0
            key = (len(prompts[-1]), max_new, tuple(until), temperature, kwargs.get("top_k"))
            groups[key].append(i)
        out = [""] * len(requests)
        for (_, max_new, until, temperature, top_k), members in groups.items():
            for lo in range(0, len(members), self.batch_size):
                batch = members[lo:lo + self.batch_size]
                texts = self._generate([prompts[i] for i in batch], max_new, list(until),
                                       temperature, top_k)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str],
                  temperature: float, top_k: Optional[int]) -> list[str]:
        """Decode prompts of one length through one cache until every row holds a stop string
        (or max_new tokens); each row's text up to its first stop."""
        from looped.model.generation import sample
        from looped.training.device import autocast

        ids = torch.tensor(prompts, device=self.device)
        cache = self.model.new_cache(len(prompts), ids.shape[1] + max_new, self.loops,
                                     self.kv or "per_iteration")
        new: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)  # max_gen_toks=0: nothing
        with autocast(self.device):
            for _ in range(max_new):
                logits = self.model(ids, loops=self.loops, cache=cache, exit=self.exit).logits
                ids = sample(logits[:, -1], temperature, top_k)  # (B, 1): the next input
                texts = []
                for row, token in zip(new, ids[:, 0].tolist()):
                    row.append(token)
                    texts.append(self.tok_decode(row))
                if all(any(s in text for s in until) for text in texts):
                    break
        for stop in until:
            texts = [text.split(stop)[0] for text in texts]
        return texts
