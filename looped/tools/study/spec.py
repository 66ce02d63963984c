"""A study file: base overrides, named variants, seeds and optional grid axes, expanded into runs.

    # configs/study/NAME.yaml
    description: what the study asks
    base: [task=text, loop=1, model.n_layers=12]     # train.py overrides of every run
    variants:                                         # name -> overrides on top of base
      vanilla: [model.depth_attention.enabled=false]
      depth_attention: []
    grid: {task: [roots, chain]}                      # optional axes: every combination
    # a grid value may carry its own overrides, e.g. a task's knobs (each task has its own):
    # grid: {task: {roots: [task.chain_len=4], chain: [task.hops=3]}}
    seeds: [0, 1, 2]
    reference: vanilla                                # paired differences are against it
    pairs: [[depth_attention, vanilla]]               # optional: more [variant, baseline] pairs
    cache_bytes: false                                # optional: KV bytes per token per variant
    metric: bits_per_byte                   # accuracy | solved | loss | bits_per_byte
    eval: {loops: [1], n_samples: 1024}               # the `looped eval` sweep of each run
    difficulty: {knob: length, levels: [32, 128], loops: [32, 192]}  # optional: harder splits
    launcher: slurm                                   # local (default) | slurm | submitit_local
    slurm: {nodes: 2, gpus_per_node: 8}               # each run trains on 16 GPUs, one job

Each (grid point, variant, seed) is one run: `python -m looped train <base> <grid point>
<grid point's overrides> <variant> seed=<k>` in `<out>/[<grid point>/]<variant>/seed<k>`, then
`python -m looped eval` on it. `looped study FILE key=value ...` overrides the study's own keys
(seeds, jobs, out, ...; `extra=[...]` adds train.py overrides to every run).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from looped.config import first_line, load_config, load_yaml
from looped.errors import ConfigError, LoopedError
from looped.training.distributed import check_parallel

METRICS = {"accuracy": "higher", "solved": "higher", "loss": "lower", "bits_per_byte": "lower"}
LAUNCHERS = ("local", "slurm", "submitit_local", "submitit_debug")


@dataclass
class StudyEval:
    loops: list[int] = field(default_factory=list)  # empty: the training default for its loop
    n_samples: int = 1024  # held-out sequences per R
    batch_size: int = 256  # held-out sequences per forward


@dataclass
class StudyDifficulty:
    """Each run scored on harder held-out splits (task.eval.<knob> at each level) at each R:
    `looped eval knob=... levels=... loops=...`, a stage after the loop sweep."""

    knob: Optional[str] = None  # a task knob, e.g. length or hops; null: no difficulty grid
    levels: list[int] = field(default_factory=list)  # the knob's held-out values
    loops: list[int] = field(default_factory=list)  # the loop counts each level is scored at
    n_samples: int = 256  # held-out sequences per (level, R)
    batch_size: int = 64  # held-out sequences per forward


@dataclass(frozen=True)
class DifficultySweep:
    """StudyDifficulty as a run carries it (hashable, picklable)."""

    knob: str
    levels: tuple[int, ...]
    loops: tuple[int, ...]
    n_samples: int
    batch_size: int

    def settings(self) -> dict:
        return {"knob": self.knob, "levels": list(self.levels), "loops": list(self.loops),
                "n_samples": self.n_samples, "batch_size": self.batch_size}


@dataclass
class SlurmOptions:
    partition: Optional[str] = None  # the SLURM partition; null: the cluster's default
    timeout_min: int = 240  # per run
    mem_gb: float = 8.0  # per node of a run's job
    cpus_per_task: int = 0  # 0: the study's threads
    nodes: int = 1  # nodes per run; a run trains data-parallel over all of them
    gpus_per_node: int = 0  # GPUs per node of a run's job; 0: a CPU job
    # training processes per node: 0 is one per GPU (or 1 on a CPU job); more than one makes
    # the run data-parallel over nodes x tasks_per_node processes (DDP or FSDP, train.parallel)
    tasks_per_node: int = 0
    # more submitit parameters, e.g. {slurm_account: x, slurm_qos: y}
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudySpec:
    description: str = ""  # what the study asks (shown in its summary.md)
    base: list[str] = field(default_factory=list)  # train.py overrides of every run
    variants: dict[str, list[str]] = field(default_factory=dict)  # name -> overrides on base
    # axis -> values, or value -> the overrides that come with it (normalised to the latter)
    grid: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every variant at each seed
    reference: Optional[str] = None  # default: the first variant
    # more paired comparisons: [variant, baseline] pairs, each reported like the reference's
    pairs: list[list[str]] = field(default_factory=list)
    # add each variant's KV-cache bytes per token (fp32, every depth position) to the report
    cache_bytes: bool = False
    metric: str = "accuracy"  # accuracy | solved (whole sequences right) | loss | bits_per_byte
    # R values the markdown table reports (default: every evaluated R)
    report_loops: list[int] = field(default_factory=list)
    eval: StudyEval = field(default_factory=StudyEval)
    # optional: harder held-out splits; adding it later scores finished runs without retraining
    difficulty: StudyDifficulty = field(default_factory=StudyDifficulty)
    out: str = ""  # the runs; default runs/study/<file stem>
    results: str = ""  # CSVs, markdown, figures; default <out>/results
    threads: int = 1  # torch threads per run; results are reproducible at a fixed value
    jobs: int = 0  # runs at a time on the local launcher; 0: cores // threads
    launcher: str = "local"  # local | slurm | submitit_local | submitit_debug
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    extra: list[str] = field(default_factory=list)  # appended to every run's overrides
    only: list[str] = field(default_factory=list)  # run only these variants
    dry_run: bool = False  # list the runs and their status, run nothing
    # write the report of the runs finished so far and run nothing (e.g. while the study runs
    # in another process)
    report_only: bool = False
    name: str = ""  # the file's stem


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study and what it takes to reproduce it."""

    variant: str
    seed: int
    grid: tuple[tuple[str, str], ...]  # (key, value) of its grid point
    overrides: tuple[str, ...]  # the train.py overrides, without seed / out_dir / name
    run_dir: str
    threads: int
    eval_loops: tuple[int, ...]
    eval_n_samples: int
    eval_batch_size: int
    # the processes the run trains on and the GPUs its job has per node; not part of what the
    # run is: the trainer makes the same training at any world size
    world_size: int = 1
    gpus_per_node: int = 0
    difficulty: Optional[DifficultySweep] = None  # the study's difficulty grid, if it has one

    @property
    def grid_label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.grid)

    @property
    def label(self) -> str:
        return f"{self.grid_label}/{self.variant}" if self.grid else self.variant

    @property
    def key(self) -> str:
        """How reports name the run: [grid point/]variant/seed<k>."""
        return f"{self.label}/seed{self.seed}"

    def train_argv(self) -> list[str]:
        run = Path(self.run_dir)
        return [*self.overrides, f"seed={self.seed}", f"out_dir={run.parent}",
                f"name={run.name}", f"threads={self.threads}"]


def load_study(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    """Read and validate a study file with `key=value` overrides of its keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    base = OmegaConf.structured(StudySpec)  # dataclass nodes reject unknown keys
    try:
        spec = OmegaConf.merge(base, load_yaml(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"argument '{item}' is not of the form key=value")
            spec.merge_with_dotlist([item])
    except (OmegaConfBaseException, yaml.YAMLError) as e:  # a bad value on the command line
        raise ConfigError(f"{path}: {first_line(e)} (study keys: "
                          f"{', '.join(StudySpec.__dataclass_fields__)})") from None
    spec: StudySpec = OmegaConf.to_object(spec)
    spec.name = spec.name or path.stem
    spec.out = spec.out or str(Path("runs") / "study" / spec.name)
    spec.results = spec.results or str(Path(spec.out) / "results")
    _validate(spec, path)
    return spec


def _validate(spec: StudySpec, path: Path) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{path}: {message}")

    need(bool(spec.variants), "a study needs at least one variant under `variants:`")
    need(bool(spec.seeds) and len(set(spec.seeds)) == len(spec.seeds),
         f"seeds must be a non-empty list of distinct seeds, got {spec.seeds}")
    need(spec.metric in METRICS,
         f"unknown metric '{spec.metric}'; choose one of: {', '.join(METRICS)}")
    reference = spec.reference or next(iter(spec.variants))
    need(reference in spec.variants,
         f"reference '{reference}' is not a variant; choose one of: {', '.join(spec.variants)}")
    spec.reference = reference
    for pair in spec.pairs:
        need(len(pair) == 2 and all(v in spec.variants for v in pair),
             f"pairs: each entry is [variant, baseline] of two variants, got {pair}")
    unknown = [v for v in spec.only if v not in spec.variants]
    need(not unknown, f"only: unknown variant(s) {', '.join(unknown)}; choose from: "
                      f"{', '.join(spec.variants)}")
    need(spec.launcher in LAUNCHERS,
         f"unknown launcher '{spec.launcher}'; choose one of: {', '.join(LAUNCHERS)}")
    need(spec.threads >= 1 and spec.jobs >= 0, "threads must be >= 1 and jobs >= 0")
    _validate_job(spec, need)
    need(all(r >= 1 for r in spec.eval.loops + spec.report_loops), "loop counts must be >= 1")
    need(spec.eval.n_samples >= 1 and spec.eval.batch_size >= 1,
         "eval.n_samples and eval.batch_size must be >= 1")
    _validate_difficulty(spec.difficulty, need)
    need(spec.difficulty.knob is None or spec.metric != "bits_per_byte",
         "the difficulty grid scores accuracy, solved and loss; metric=bits_per_byte has no "
         "harder split")
    reserved = ("seed", "out_dir", "name", "threads", "resume", "resume_from")
    for key, values in spec.grid.items():
        need(isinstance(values, (list, dict)) and bool(values), f"grid axis '{key}' has no values")
        need(key not in reserved, f"grid axis '{key}': the study sets it itself")
        need(len({str(v) for v in values}) == len(values),
             f"grid axis '{key}' repeats a value: {list(values)}")
        need(all(v is not None and "/" not in str(v) and not isinstance(v, (dict, list))
                 for v in values),
             f"grid axis '{key}': values must be plain scalars without '/', got {list(values)}")
        if isinstance(values, dict):
            need(all(isinstance(o, list) and all(isinstance(i, str) for i in o)
                     for o in values.values()),
                 f"grid axis '{key}': each value maps to a list of key=value overrides")
        else:
            spec.grid[key] = {v: [] for v in values}
        spec.grid[key] = {str(v): list(o or []) for v, o in spec.grid[key].items()}
    for name in spec.variants:
        need(name and "/" not in name and not name.startswith("."),
             f"variant name '{name}' must be a plain directory name")
    grid_items = [o for axis in spec.grid.values() for ovs in axis.values() for o in ovs]
    for item in [*spec.base, *spec.extra, *grid_items,
                 *(o for v in spec.variants.values() for o in v)]:
        need(not item.startswith(tuple(f"{k}=" for k in reserved)),
             f"'{item}': the study sets seed, out_dir, name, threads and resume itself")


def _validate_difficulty(d: StudyDifficulty, need: Callable[[bool, str], None]) -> None:
    if d.knob is None:
        need(not d.levels and not d.loops,
             "difficulty: levels and loops need a knob (difficulty.knob=length, for example)")
        return
    need(bool(d.levels) and bool(d.loops),
         f"difficulty.knob={d.knob} needs levels=[...] and loops=[...] too")
    need(all(r >= 1 for r in d.loops), "difficulty.loops must be >= 1")
    need(len(set(d.levels)) == len(d.levels) and len(set(d.loops)) == len(d.loops),
         "difficulty.levels and difficulty.loops must not repeat a value")
    need(d.n_samples >= 1 and d.batch_size >= 1,
         "difficulty.n_samples and difficulty.batch_size must be >= 1")


def difficulty_sweep(spec: StudySpec) -> Optional[DifficultySweep]:
    d = spec.difficulty
    if d.knob is None:
        return None
    return DifficultySweep(d.knob, tuple(d.levels), tuple(d.loops), d.n_samples, d.batch_size)


def _validate_job(spec: StudySpec, need: Callable[[bool, str], None]) -> None:
    """The knobs of each run's job: nodes, GPUs and processes per node."""
    s = spec.slurm
    need(s.nodes >= 1, f"slurm.nodes must be >= 1, got {s.nodes}")
    need(s.gpus_per_node >= 0, f"slurm.gpus_per_node must be >= 1 for a GPU job (0: a CPU "
                               f"job), got {s.gpus_per_node}")
    need(s.tasks_per_node >= 0, f"slurm.tasks_per_node must be >= 1 (0: one per GPU), got "
                                f"{s.tasks_per_node}")
    # the trainer puts local rank k on cuda:k, so a node runs exactly one process per GPU
    need(not s.gpus_per_node or s.tasks_per_node in (0, s.gpus_per_node),
         f"slurm.tasks_per_node={s.tasks_per_node} with slurm.gpus_per_node={s.gpus_per_node}: "
         f"a GPU job runs one process per GPU; drop tasks_per_node")
    world = world_size(spec)
    need(world == 1 or spec.launcher != "local",
         f"launcher=local trains each run in one process, but slurm.nodes x tasks per node is "
         f"{world}; use launcher=slurm (launcher=submitit_local on this machine)")
    need(s.nodes == 1 or spec.launcher == "slurm",
         f"launcher={spec.launcher} runs on this machine only; slurm.nodes={s.nodes} needs "
         f"launcher=slurm")
    need(world == 1 or spec.launcher != "submitit_debug",
         "launcher=submitit_debug runs a job in this process, one task only; use "
         "launcher=submitit_local for several processes per run")


def tasks_per_node(spec: StudySpec) -> int:
    return spec.slurm.tasks_per_node or spec.slurm.gpus_per_node or 1


def world_size(spec: StudySpec) -> int:
    """The processes each run trains on."""
    return spec.slurm.nodes * tasks_per_node(spec)


def jobs_for(spec: StudySpec) -> int:
    return spec.jobs or max(1, (os.cpu_count() or 1) // spec.threads)


def expand(spec: StudySpec) -> list[RunSpec]:
    """Every run of the study: grid point by grid point, seed by seed, variant by variant."""
    keys = list(spec.grid)
    points = [tuple(zip(keys, combo))
              for combo in itertools.product(*(spec.grid[k] for k in keys))]
    out = Path(spec.out).resolve()
    runs = []
    for point in points:
        where = out / ",".join(f"{k}={v}" for k, v in point) if point else out
        # seed-major, so a study stopped part-way has whole seeds to compare
        for seed in spec.seeds:
            for variant, overrides in spec.variants.items():
                if spec.only and variant not in spec.only:
                    continue
                # the grid point comes before the variant: a variant may override what it sets
                args = (*spec.base, *(f"{k}={v}" for k, v in point),
                        *(o for k, v in point for o in spec.grid[k][v]), *overrides, *spec.extra)
                runs.append(RunSpec(variant, seed, point, tuple(args),
                                    str(where / variant / f"seed{seed}"), spec.threads,
                                    tuple(spec.eval.loops), spec.eval.n_samples,
                                    spec.eval.batch_size, world_size(spec),
                                    spec.slurm.gpus_per_node, difficulty_sweep(spec)))
    return runs


def comparisons(spec: StudySpec) -> list[tuple[str, str]]:
    """(variant, baseline) pairs: every variant against the reference, then the study's pairs."""
    out = [(v, spec.reference) for v in spec.variants if v != spec.reference]
    return out + [tuple(p) for p in spec.pairs if tuple(p) not in out]


def check_run_config(run: RunSpec) -> Optional[str]:
    """The one-line problem with a run's config, or None if it resolves."""
    try:
        cfg = load_config([*run.overrides, f"seed={run.seed}"])
        check_parallel(cfg.train.parallel)
    except LoopedError as e:
        return str(e)
    if cfg.train.batch_size % run.world_size:  # caught here rather than by every rank's job
        return (f"train.batch_size={cfg.train.batch_size} is the global batch and must be "
                f"divisible by the run's {run.world_size} processes (slurm.nodes x tasks per "
                f"node)")
    if run.gpus_per_node and cfg.device == "cpu":
        return (f"device=cpu, but the run's job asks for slurm.gpus_per_node="
                f"{run.gpus_per_node}; drop device=cpu (auto trains on the GPUs) or the GPUs")
    if run.eval_loops and cfg.loop not in run.eval_loops:  # the report compares at trained R
        return (f"the study's eval.loops {list(run.eval_loops)} leave out this run's trained "
                f"loop={cfg.loop}")
    return None
