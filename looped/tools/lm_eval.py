"""`looped lm-eval run=DIR tasks=A,B`: score a trained run with lm-evaluation-harness through
looped's own forward (any attention, cross-layer method, exit criterion, KV cache policy and loop
count; `looped export` covers plain GQA only):

    looped lm-eval run=runs/text tasks=lambada_openai,hellaswag batch_size=16 device=cuda
    looped lm-eval run=runs/text tasks=my_task include_path=tasks/ loops=16 out=scores.json
    looped lm-eval run=runs/text tasks=my_task include_path=tasks/ exit=kl kv=last

Needs the lm-eval extra (pip install 'looped[lm-eval]'). Datasets load as lm-eval loads them
(with HF_DATASETS_OFFLINE=1, a task over local files runs offline). Prints each task's metrics;
out= writes lm-eval's results as JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, cli_main


@dataclass
class LmEvalArgs:
    run: str = ""  # a run directory or one of its checkpoint directories (required)
    tasks: list[str] = field(default_factory=list)  # lm-eval task names, a,b or [a,b] (required)
    batch_size: int = 8  # requests per forward; 0: as many as fit in memory
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda; bf16 autocast on CUDA
    loops: Optional[int] = None  # iterations of the core; null: the run's trained loop
    limit: Optional[int] = None  # at most this many documents per task; null: all
    num_fewshot: Optional[int] = None  # few-shot examples; null: each task's default
    include_path: Optional[str] = None  # a directory of your own task YAMLs
    out: Optional[str] = None  # write the results JSON here
    exit: Optional[str] = None  # an exit criterion (kl, entropy, latent, gate, ...); null: run's
    threshold: Optional[float] = None  # the exit criterion's threshold; null: the run's
    # score and decode through a KV cache of this policy (per_iteration | last), every scored
    # token decoded one at a time; null: one full forward per batch
    kv: Optional[str] = None
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, LmEvalArgs)


def parse_args(argv: list[str]) -> LmEvalArgs:
    """The arguments, checked before lm-eval or the run is loaded (both take seconds)."""
    from looped.model.cache_policy import CACHE_POLICIES
    from looped.training.checkpoint import resolve_checkpoint, run_dir_of
    from looped.training.device import pick_device

    args: LmEvalArgs = parse_tool_args(LmEvalArgs, argv, bare_lists=("tasks",))  # tasks=a,b
    if not args.run or not args.tasks:
        raise ConfigError("give a run and tasks: looped lm-eval run=runs/NAME tasks=TASK[,TASK]")
    run_dir_of(resolve_checkpoint(Path(args.run)))  # a run (with config.yaml and a checkpoint)
    for name, low in (("batch_size", 0), ("loops", 1), ("limit", 1), ("num_fewshot", 0),
                      ("threads", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    pick_device(args.device)  # a bad name or a missing GPU fails before anything loads
    if args.kv is not None:
        CACHE_POLICIES.lookup(args.kv)
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ConfigError(f"include_path={args.include_path} is not a directory")
    return args


def evaluate(args: LmEvalArgs) -> dict:
    """lm-eval's results dict for the run on the tasks."""
    from looped.integrations.lm_eval_model import LoopedEvalLM  # first: names the missing extra
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in args.tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)} (include_path= adds a "
                          f"directory of task YAMLs)")
    lm = LoopedEvalLM(args.run, batch_size=args.batch_size, device=args.device,
                      loops=args.loops, exit=args.exit, threshold=args.threshold, kv=args.kv)
    res = simple_evaluate(model=lm, tasks=list(args.tasks), task_manager=manager,
                          limit=args.limit, num_fewshot=args.num_fewshot)
    res["config"]["looped"] = {"run": args.run, "loops": lm.loops, "batch_size": lm.batch_size,
                               "exit": lm.cfg.exit.criterion, "kv": args.kv}
    return res


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = evaluate(args)
    for task, metrics in res["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, (int, float)) and "stderr" not in k)
        print(f"{task}: {shown}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                "higher_is_better", "n-samples", "config")
        out.write_text(json.dumps({k: res[k] for k in keep if k in res}, indent=2,
                                  default=str) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
