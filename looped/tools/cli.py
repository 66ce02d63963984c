"""The `looped` command: one entry point, subcommands that all take `key=value` arguments.

    looped train loop=8                       # = python train.py loop=8
    looped eval ckpt=runs/main loops=[1,2,4,8,16]
    looped study configs/study/text_plain.yaml
    looped bench depth                        # Depth-Attention vs vanilla, same weights
    looped bench loop ckpt=runs/main          # adaptive exit and the KV cache of a looped run
    looped weights ckpt=runs/main loops=[8,64]  # Depth-Attention's weights by source, per R
    looped flops model=3b
    looped generate run=runs/text prompt="ROMEO:"
    looped export run=runs/main out=hf/main
    looped data prepare corpus=path/to/text out=data/text

`looped SUBCOMMAND --help` lists the subcommand's keys, their defaults and one line each.
`python -m looped ...` is the same command without the console script.
"""

from __future__ import annotations

import importlib
import sys

from looped.errors import ConfigError, cli_main

# name -> (module with main(argv) and help(), one line)
SUBCOMMANDS = {
    "train": ("looped.tools.train", "train a model (the main job: looped train loop=8)"),
    "eval": ("looped.tools.evaluate", "score trained runs at several loop counts"),
    "study": ("looped.tools.study.cli", "run a multi-seed study file, then aggregate it"),
    "bench": ("looped.tools.bench", "benchmarks: `bench depth`, `bench decode`, `bench loop`, `bench cache` and `bench data`"),
    "weights": ("looped.tools.depth_weights", "where Depth-Attention's weight goes, at the trained R and beyond"),
    "flops": ("looped.tools.flops", "FLOPs, parameters, KV cache and extra state per token"),
    "generate": ("looped.tools.generate", "sample from a trained run"),
    "export": ("looped.tools.export", "a trained run as a transformers model directory"),
    "lm-eval": ("looped.tools.lm_eval", "score a run with lm-evaluation-harness, natively"),
    "data": ("looped.tools.data", "prepare a corpus once into memory-mapped token shards"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = [f"  {name:<{width}}  {line}" for name, (_, line) in SUBCOMMANDS.items()]
    return "\n".join(["usage: looped SUBCOMMAND [key=value ...]   (looped SUBCOMMAND --help)",
                      "", "subcommands:", *rows])


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise ConfigError(f"unknown subcommand '{name}'; choose one of: {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if any(a in ("-h", "--help") for a in rest):
        print(module.help_text([a for a in rest if a not in ("-h", "--help")]))
        return 0
    return module.main(rest)


def run() -> None:
    """The console script `looped`."""
    cli_main(main, sys.argv[1:])


if __name__ == "__main__":
    run()
