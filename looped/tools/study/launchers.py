"""Where a study's runs execute: here, N at a time (`local`), or through submitit (`slurm`, and
`submitit_local` / `submitit_debug`, submitit's own local executors, for trying the path out).
Under submitit a run may span several processes, nodes x tasks per node (docs/cluster.md).

A launcher takes the runs still to do and returns one RunStatus per run. Runs are independent
processes that write only to their own directory, so any launcher may run them in any order.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from looped.errors import ConfigError
from looped.tools.study.runner import RunStatus, run_one, run_one_distributed
from looped.tools.study.spec import (RunSpec, StudySpec, jobs_for, tasks_per_node,
                                    world_size)

Report = Callable[[RunStatus], None]


def run_local(runs: list[RunSpec], spec: StudySpec, report: Report) -> list[RunStatus]:
    """`jobs` runs at a time, each a subprocess with `threads` torch threads."""
    out: list[RunStatus] = []
    pool = ThreadPoolExecutor(max_workers=jobs_for(spec))
    try:
        with tqdm(total=len(runs), desc=f"study {spec.name}", unit="run", disable=None,
                  dynamic_ncols=True) as bar:
            futures = [pool.submit(run_one, run) for run in runs]
            for future in as_completed(futures):
                status = future.result()
                out.append(status)
                bar.update(1)
                bar.clear()
                report(status)
                bar.refresh()
    finally:  # on Ctrl-C start nothing more; the runs in flight get the signal themselves
        pool.shutdown(wait=True, cancel_futures=True)
    return out


SUBMITIT_CLUSTERS = {"slurm": "slurm", "submitit_local": "local", "submitit_debug": "debug"}


def run_submitit(runs: list[RunSpec], spec: StudySpec, report: Report) -> list[RunStatus]:
    """One submitit job per run (a job array on SLURM); the folder for its logs and pickles is
    <out>/.submitit. Runs need the repository and its Python environment on a shared
    filesystem, as submitit jobs always do. A run of more than one process (slurm.nodes,
    one task per GPU) is one job of nodes x tasks_per_node tasks that train it together."""
    if importlib.util.find_spec("submitit") is None:
        raise ConfigError(f"launcher={spec.launcher} needs submitit: pip install "
                          f"'looped[slurm]' (in a clone: pip install -e '.[slurm]')")
    import submitit

    executor = submitit.AutoExecutor(folder=str(Path(spec.out).resolve() / ".submitit"),
                                     cluster=SUBMITIT_CLUSTERS[spec.launcher])
    s = spec.slurm
    world = world_size(spec)
    params = dict(timeout_min=s.timeout_min, cpus_per_task=s.cpus_per_task or spec.threads,
                  mem_gb=s.mem_gb, name=f"study-{spec.name}", **s.parameters)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if world > 1:
        params.update(nodes=s.nodes, tasks_per_node=tasks_per_node(spec))
    if s.partition:
        params["slurm_partition"] = s.partition
    try:
        executor.update_parameters(**params)
    except (NameError, TypeError, ValueError) as e:  # submitit names the unknown parameter
        raise ConfigError(f"slurm: {str(e).strip().splitlines()[0]}") from None
    # one process per run trains in a subprocess, as the local launcher does; several train
    # in the job's own processes, which submitit starts on every node
    jobs = executor.map_array(run_one_distributed if world > 1 else run_one, runs)
    each = f", {world} processes each ({s.nodes} node(s))" if world > 1 else ""
    print(f"submitted {len(jobs)} job(s) through submitit ({spec.launcher}){each}; logs under "
          f"{Path(spec.out) / '.submitit'}", flush=True)
    out = []
    for run, job in zip(runs, jobs):
        try:
            status = job.task(0).result()  # rank 0's: the others return None
        except Exception as e:  # the job itself died (time limit, node failure, OOM)
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            status = RunStatus(run, "failed", error=f"submitit job {job.job_id}: "
                                                    f"{lines[-1] if lines else type(e).__name__}")
        out.append(status)
        report(status)
    return out


def launch(runs: list[RunSpec], spec: StudySpec, report: Report) -> list[RunStatus]:
    if not runs:
        return []
    if spec.launcher == "local":
        return run_local(runs, spec, report)
    return run_submitit(runs, spec, report)
