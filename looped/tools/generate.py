"""`looped generate run=DIR [key=value ...]`: sample from a trained run and print the result.

    looped generate run=runs/shakespeare prompt="ROMEO:" max_new_tokens=300 temperature=0.8
    looped generate run=runs/main loops=16 exit.criterion=kl exit.threshold=0.01
    looped generate run=runs/main loops=32 kv=last      # a cache whose size does not grow with R
    looped generate run=runs/shakespeare compile=true   # a compiled decode step
    looped generate run=runs/addition                   # a held-out row's prompt, ids printed

A text run prints text (its tokenizer decodes); a token task prints token ids, and with no
prompt it continues a held-out sequence from its first answer position and prints the answer
beside it. `exit.*` keys choose an adaptive-exit criterion and its knobs, as in the run config.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch

from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, ShapeError, cli_main


@dataclass
class GenerateArgs:
    run: str = ""  # a run directory, or one of its checkpoint directories
    prompt: str = ""  # text (text runs) or space-separated token ids; empty: a held-out prompt
    max_new_tokens: int = 200  # tokens to append
    temperature: float = 0.8  # 0: greedy
    top_k: Optional[int] = None  # sample among the k most likely tokens; null: all
    loops: Optional[int] = None  # iterations of the core; null: the run's trained loop
    samples: int = 1  # continuations of the same prompt
    seed: int = 0  # the sampling generator's seed
    use_cache: bool = True  # decode with the KV cache (false: recompute the prefix each token)
    kv: str = "per_iteration"  # cache policy: per_iteration (exact) | last (one slot per layer)
    compile: bool = False  # decode through a step torch.compile captures once (no exit)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, GenerateArgs)


def split_args(argv: list[str]) -> tuple[list[str], list[str], Optional[str]]:
    """(the tool's own key=value items, the `exit.*` items meant for the run's config, the
    prompt verbatim: text is not parsed as YAML, so `prompt=ROMEO:` stays a string)."""
    prompts = [a.split("=", 1)[1] for a in argv if a.startswith("prompt=")]
    own = [a for a in argv if not a.startswith(("exit.", "prompt="))]
    return own, [a for a in argv if a.startswith("exit.")], (prompts[-1] if prompts else None)


def _prompt_ids(args: GenerateArgs, task) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(prompt (1, T), the held-out answer that follows it or None)."""
    tokenizer = getattr(task, "tokenizer", None)
    if args.prompt:
        if tokenizer is not None:
            ids = tokenizer.encode(args.prompt).long()
        else:
            try:
                ids = torch.tensor([int(t) for t in args.prompt.split()])
            except ValueError:
                raise ConfigError(f"prompt: this task takes space-separated token ids "
                                  f"(0..{task.vocab_size - 1}), got '{args.prompt}'") from None
            if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < task.vocab_size:
                raise ConfigError(f"prompt: token ids must be in 0..{task.vocab_size - 1}")
        if ids.numel() == 0:
            raise ConfigError("prompt: it encodes to no tokens")
        return ids[None], None
    batch = task.sample(1, torch.Generator().manual_seed(args.seed))
    answers = (batch.targets[0] >= 0).nonzero().flatten()
    cut = int(answers[0]) + 1 if answers.numel() else batch.inputs.shape[1] // 2
    return batch.inputs[:, :cut], batch.inputs[0, cut:]


def main(argv: list[str]) -> int:
    from looped import load_run
    from looped.data import build_task
    from looped.model.exit import build_exit

    own, exit_overrides, prompt = split_args(argv)
    args: GenerateArgs = parse_tool_args(GenerateArgs, own)
    args.prompt = prompt if prompt is not None else args.prompt
    if not args.run:
        raise ConfigError("give the run to sample from: looped generate run=runs/NAME")
    for name, low in (("max_new_tokens", 1), ("samples", 1)):
        if getattr(args, name) < low:
            raise ConfigError(f"{name} must be >= {low}, got {getattr(args, name)}")
    if not args.use_cache and (args.kv != "per_iteration" or args.compile):
        raise ConfigError("kv= and compile=true decode through the cache; use_cache=false has "
                          "none")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise ConfigError("temperature must be >= 0 and top_k >= 1 (or null)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model = load_run(args.run, exit_overrides)
    task = build_task(cfg.task, split="eval")
    prompt, expected = _prompt_ids(args, task)
    room = cfg.model.max_seq_len - prompt.shape[1]
    if room < 1:
        raise ShapeError(f"the prompt has {prompt.shape[1]} tokens; the model takes at most "
                         f"{cfg.model.max_seq_len}")
    n_new = min(args.max_new_tokens, room)
    if n_new < args.max_new_tokens:
        print(f"(max_new_tokens cut to {n_new}: model.max_seq_len={cfg.model.max_seq_len})",
              file=sys.stderr)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        out, iters = model.generate(
            prompt.expand(args.samples, -1), n_new, temperature=args.temperature,
            top_k=args.top_k, use_cache=args.use_cache, loops=args.loops,
            exit=build_exit(cfg.exit), generator=gen, return_iterations=True, kv=args.kv,
            compile=args.compile)
    tokenizer = getattr(task, "tokenizer", None)
    for i in range(args.samples):
        new = out[i, prompt.shape[1]:]
        if args.samples > 1:
            print(f"--- sample {i + 1}")
        if tokenizer is not None:
            print(tokenizer.decode(prompt[0]) + tokenizer.decode(new))
        else:
            print("prompt:   ", " ".join(map(str, prompt[0].tolist())))
            print("generated:", " ".join(map(str, new.tolist())))
            if expected is not None:
                print("held out: ", " ".join(map(str, expected[:n_new].tolist())))
        if cfg.exit.criterion != "none":
            print(f"(mean iterations per token: {iters[i].float().mean():.2f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
