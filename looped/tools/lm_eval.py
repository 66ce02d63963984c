"""Score a trained run with lm-evaluation-harness through looped's own forward (any attention
kind, cross-layer method and loop count; `looped export` covers GQA only):

    python -m looped lm-eval run=runs/text tasks=[lambada_openai] batch_size=16 device=cuda
    python -m looped lm-eval run=runs/text tasks=[my_task] include_path=tasks/ out=scores.json

Needs the lm-eval extra (pip install 'looped[lm-eval]'). Datasets come from lm-eval's own
loading (HF_DATASETS_OFFLINE=1 with local files works offline).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, cli_main


@dataclass
class LmEvalArgs:
    run: Optional[str] = None  # a run directory or one of its checkpoints (required)
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (required)
    batch_size: int = 8  # requests per forward
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda; bf16 autocast on CUDA
    loops: Optional[int] = None  # R to score at; null: the run's trained loop
    limit: Optional[int] = None  # at most this many documents per task
    num_fewshot: Optional[int] = None  # few-shot examples; null: each task's default
    include_path: Optional[str] = None  # a directory of your own task YAMLs
    out: Optional[str] = None  # write lm-eval's results as JSON here


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, LmEvalArgs)


def parse_args(argv: list[str]) -> LmEvalArgs:
    items = [f"tasks=[{v}]" if k == "tasks" and eq and not v.startswith("[") else item
             for item in argv for k, eq, v in [item.partition("=")]]
    args: LmEvalArgs = parse_tool_args(LmEvalArgs, items)
    if not args.run or not args.tasks:
        raise ConfigError("give a run and tasks: looped lm-eval run=runs/NAME tasks=[TASK,...]")
    if not Path(args.run).exists():
        raise ConfigError(f"run={args.run}: no such run directory")
    for name in ("batch_size", "loops", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.include_path and not Path(args.include_path).is_dir():
        raise ConfigError(f"include_path={args.include_path}: not a directory")
    return args


def evaluate(args: LmEvalArgs) -> dict:
    from looped.lm_eval_model import LoopedEvalLM  # registers model "looped"; names the extra
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in args.tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = LoopedEvalLM(args.run, batch_size=args.batch_size, device=args.device,
                      loops=args.loops)
    return simple_evaluate(model=lm, tasks=list(args.tasks), task_manager=manager,
                           limit=args.limit, num_fewshot=args.num_fewshot, log_samples=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    res = evaluate(args)
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": res["results"],
                                              "config": {"run": args.run, "loops": args.loops}},
                                             indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
