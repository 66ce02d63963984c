"""`looped export run=DIR out=DIR`: a trained run as a `transformers` model directory.

    looped export run=runs/main out=hf/main
    looped export run=runs/shakespeare out=hf/shakespeare

The directory loads with transformers alone (pip install -e '.[hf]' brings it):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/main", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("hf/main", trust_remote_code=True)

It holds config.json (auto_map), model.safetensors, modeling_looped.py and
configuration_looped.py, and the run's tokenizer (bytes, BPE's tokenizer.json, or a task's token
table). The export loads it back and fails if its logits differ from the run's by more than
1e-5. Not exported: cross-layer baselines, mix=raw, and adaptive exit (the exported model runs
every token through all `loops` iterations; pass loops=R to its forward or generate).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError, cli_main


@dataclass
class ExportArgs:
    run: str = ""  # a run directory, or one of its checkpoint directories (required)
    out: str = ""  # the directory to write (required; new, empty, or an earlier export)
    check: bool = True  # load the export back and compare its logits with the run's


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, ExportArgs)


def main(argv: list[str]) -> int:
    from looped import load_run
    from looped.data import build_task
    from looped.integrations.hf.export import check_out_dir, export_model, require_transformers

    args: ExportArgs = parse_tool_args(ExportArgs, argv)
    if not args.run or not args.out:
        raise ConfigError("give the run and the output directory: looped export run=runs/NAME "
                          "out=hf/NAME")
    check_out_dir(args.out)  # before the (slower) loading of the run
    transformers = require_transformers()
    transformers.logging.set_verbosity_error()  # the command prints its own one-line summary
    transformers.logging.disable_progress_bar()
    cfg, model = load_run(args.run)
    task = build_task(cfg.task, split="eval")
    info = export_model(cfg, model, task, args.out, check=args.check)
    err = info["max_abs_logit_error"]
    print(f"exported {args.run} -> {info['out']}: {info['parameters']:,} parameters, "
          f"loops={info['loops']}, tokenizer: {info['tokenizer']}"
          + (f", max |logit difference| {err:.1e} after loading back" if err is not None else ""))
    return 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
