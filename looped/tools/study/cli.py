"""`looped study configs/study/NAME.yaml [key=value ...]`: run a study, then aggregate it.

Finished runs are skipped, interrupted ones resume from their checkpoints, failed ones are tried
again; a failing run is reported and the others go on. Exit code 0 when every run finished, 1
when some failed (their errors are listed), 2 for a bad study file or argument.

    python -m looped study configs/study/text_plain.yaml                 # all of it
    python -m looped study configs/study/text_plain.yaml jobs=1 seeds=[0] # a part
    python -m looped study configs/study/text_plain.yaml dry_run=true     # what is done, what not
    python -m looped study configs/study/text_plain.yaml report_only=true # report what is done
    python -m looped study configs/study/paper_360m.yaml slurm.nodes=4   # each run on 4x8 GPUs
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time

from looped.config import CONFIG_DIR
from looped.errors import ConfigError, cli_main
from looped.tools.study.aggregate import write_all
from looped.tools.study.launchers import launch
from looped.tools.study.runner import RunStatus, run_state
from looped.tools.study.spec import (check_run_config, expand, jobs_for, load_study,
                                    tasks_per_node, world_size)


def help_text(argv: list[str] = ()) -> str:
    from looped.config_help import tool_help
    from looped.tools.study.spec import StudySpec

    return tool_help(__doc__, StudySpec)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    if not argv or "=" in argv[0]:
        known = sorted(str(p.relative_to(CONFIG_DIR.parent)) for p in
                       (CONFIG_DIR / "study").glob("*.yaml"))
        raise ConfigError(f"give a study file first: python -m looped study FILE [key=value ...];"
                          f" the project's: {', '.join(known)}")
    path, overrides = argv[0], argv[1:]
    spec = load_study(path, overrides)
    runs = expand(spec)
    command = shlex.join(["python", "-m", "looped", "study", path, *overrides])
    failed: dict[str, str] = {}
    todo, states = [], []
    for run in runs:
        problem = check_run_config(run)
        if problem:  # a bad variant fails alone, before anything is spent on it
            failed[run.key] = problem
        elif (state := run_state(run)) != "finished":
            todo.append(run)
            states.append(state)
    resume, score = states.count("interrupted"), states.count("to score")
    print(f"study {spec.name}: {len(runs)} runs ({len(runs) - len(todo) - len(failed)} finished,"
          f" {resume} to resume, {len(todo) - resume - score} to start, "
          f"{f'{score} to score on the difficulty grid, ' if score else ''}{len(failed)} with a "
          f"bad config); runs under {spec.out}", flush=True)
    for key, problem in failed.items():
        print(f"  FAILED {key}: {problem}", flush=True)
    if spec.dry_run:
        for run, state in zip(todo, states):
            print(f"  {state:12s} {run.key}")
        return 0
    if spec.report_only:
        todo = []
    if todo:
        world = world_size(spec)
        each = (f"{world} processes ({spec.slurm.nodes} node(s) x {tasks_per_node(spec)}) "
                f"per run, " if world > 1 else "")
        print(f"launcher {spec.launcher}: {jobs_for(spec) if spec.launcher == 'local' else '-'} "
              f"at a time, {each}{spec.threads} thread(s) each", flush=True)
    t0 = time.perf_counter()

    def report(status: RunStatus) -> None:
        key = status.run.key
        if status.state == "failed":
            failed[key] = status.error or "unknown error"
            print(f"  FAILED {key}: {status.error}", flush=True)
        else:
            res = status.result["eval"].get(str(status.result["trained_loop"]), {})
            value = res.get(spec.metric)
            shown = f"{spec.metric} {value:.4f}" if value is not None else ""
            print(f"  done   {key}{' (resumed)' if status.resumed else ''}: {shown} "
                  f"({status.result['train_seconds']:.0f} s training)", flush=True)

    launch(todo, spec, report)
    # the report covers every variant and every seed of the file, also when `only` or `seeds`
    # ran a part, so a partial rerun never shrinks a finished report
    file_seeds = load_study(path).seeds
    whole = dataclasses.replace(spec, only=[], seeds=list(dict.fromkeys(file_seeds + spec.seeds)))
    out = write_all(expand(whole), whole, command, failed)
    print(f"\n{(out / 'summary.md').read_text()}")
    if spec.report_only:
        print(f"study {spec.name}: the report of the runs finished so far, in {out}", flush=True)
        return 0
    print(f"study {spec.name}: {len(runs) - len(failed)} of {len(runs)} runs finished in "
          f"{time.perf_counter() - t0:.0f} s this time; results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
