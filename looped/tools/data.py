"""`looped data ACTION [key=value ...]`: corpora prepared once, read by memory map.

    looped data prepare corpus=path/to/corpus out=data/corpus            # bytes
    looped data prepare corpus=path/to/corpus out=data/bpe tokenizer=bpe bpe_vocab=32768
    looped data info data=data/corpus
    looped train task=text task.data=data/corpus model.vocab_size=256

`prepare` tokenizes the corpus into memory-mapped shards with its tokenizer saved beside them
(looped.data.prepare); rerun the same command to resume an interrupted one. Training, eval,
export and generate read `task.data=DIR` with memory that does not grow with the corpus, and
load the saved tokenizer instead of training one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError

ACTIONS = ("prepare", "info")


@dataclass
class InfoArgs:
    data: str = ""  # a directory written by `looped data prepare` (required)


def _args_class(action: str):
    from looped.data.prepare import PrepareArgs

    return PrepareArgs if action == "prepare" else InfoArgs


def _action(argv: list[str]) -> str:
    if not argv or argv[0] not in ACTIONS:
        got = f"'{argv[0]}'" if argv else "none"
        raise ConfigError(f"name the action first, got {got}; choose one of: {', '.join(ACTIONS)}")
    return argv[0]


def help_text(argv: list[str] = ()) -> str:
    if argv and argv[0] in ACTIONS:
        return tool_help(__doc__, _args_class(argv[0]))
    return __doc__.strip() + "\n\n`looped data ACTION --help` lists ACTION's keys."


def main(argv: list[str]) -> int:
    from looped.data.shards import corpus_summary

    action = _action(argv)
    args = parse_tool_args(_args_class(action), argv[1:])
    if action == "info":
        if not args.data:
            raise ConfigError("give the directory: looped data info data=DIR")
        print(corpus_summary(args.data))
        return 0
    from looped.data.prepare import prepare

    t0 = time.perf_counter()
    meta = prepare(args)
    seconds = time.perf_counter() - t0
    mb = meta["bytes"] / 1e6
    print(corpus_summary(args.out) + f"; {mb:,.1f} MB of text"
          + (f" in {seconds:.1f} s this time ({mb / seconds:.1f} MB/s over the whole run)"
             if meta["seconds"] else ""))
    return 0
