"""The first GPU run, prepared: every GPU check, then the paper's text claim at ~40M parameters.

    bash scripts/gpu_run.sh OUT                         # one H100: about 10 minutes
    python scripts/gpu_run.py out=OUT tiny=true         # CPU, seconds: the suite's dry run

Stages, each printing PASS / FAIL / SKIP with its time; a failing stage never stops the others
(a stage whose input failed is skipped and says why):

    environment   python, torch, the device
    wheels        the offline wheels gpu_run.sh installed (scripts/offline_wheels.sh made them)
    checks        scripts/gpu_check.py: bf16, xformers, FSDP2 on NCCL, compile, CUDA-graph
                  decode, MFU of a 360M step (CUDA only)
    corpus        text already on the machine: the sources and docs of the installed Python
                  packages, one document per file, up to corpus_mb
    prepare       `looped data prepare` (bytes, held-out split by document)
    text          a plain decoder, vanilla against Depth-Attention (strided, the paper's
                  setting), bf16 and compiled on GPU, the same token budget, `seeds` seeds:
                  held-out bits per byte and the paired difference
    looped        if looped_pair: a looped model with and without Depth-Attention (`anchor`),
                  one seed

Written to OUT: gpu_run.json (every stage, its figures) and gpu_run.md (the same, as tables).
The exit code is the number of failed stages.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A ~38M-parameter byte-level decoder: 12 layers of width 512 (the paper's strided source rule
# reads layer 0 and layer 6), full causal attention, the final-answer loss.
TEXT_MODEL = ["recipe=roots_staircase", "model.vocab_size=256", "model.d_model=512",
              "model.n_layers=12", "model.n_heads=8", "model.n_kv_heads=4", "model.head_dim=64",
              "model.ffn_dim=1536", "model.pos_embedding=false", "train.objective.loss=final",
              "train.loop_sampling.sampler=fixed", "train.warmup_fraction=0.02"]
TINY_MODEL = ["recipe=roots_staircase", "model.vocab_size=256", "model.d_model=32",
              "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
              "model.ffn_dim=64", "model.pos_embedding=false", "train.objective.loss=final",
              "train.loop_sampling.sampler=fixed"]
# the looped pair: 1 prelude + 2 shared core layers (R = 4) + 1 coda, recall
LOOPED = ["loop=4", "eval.loops=[4]", "model.n_layers=2", "model.n_prelude=1", "model.n_coda=1",
          "model.injection=add", "model.init_state=zeros"]
PLAIN = ["loop=1", "eval.loops=[1]"]
VARIANTS = {"text": {"vanilla": [*PLAIN, "model.depth_attention.enabled=false"],
                     "depth_attention": [*PLAIN, "model.depth_attention.sources=strided"]},
            "looped": {"looped": [*LOOPED, "model.depth_attention.enabled=false"],
                       "looped_anchor": [*LOOPED, "model.depth_attention.sources=anchor"]}}
TEXT_SUFFIXES = (".py", ".pyi", ".md", ".rst", ".txt")


@dataclass
class Args:
    out: str = ""  # the output folder (required)
    tiny: bool = False  # CPU, a tiny model, a few steps: the dry run the test suite makes
    corpus: str = ""  # a folder of text to use as it is; "": gather the installed packages'
    corpus_mb: float = 300.0  # at most this much text gathered
    held_out: float = 0.005  # the fraction of documents held out (by content hash)
    seeds: int = 2
    steps: int = 2000  # per run: steps x batch_size x seq_len tokens (2000 x 32 x 512 = 33M)
    batch_size: int = 32
    seq_len: int = 512
    looped_pair: bool = True  # also the looped model with and without Depth-Attention

    @classmethod
    def parse(cls, argv: list[str]) -> "Args":
        args = cls()
        for item in argv:
            key, sep, value = item.partition("=")
            if not sep or not hasattr(args, key):
                raise SystemExit(f"error: unknown argument '{item}'; keys: "
                                 f"{', '.join(cls.__dataclass_fields__)}")
            kind = type(getattr(args, key))
            setattr(args, key, value.lower() in ("1", "true", "yes") if kind is bool
                    else kind(value))
        if not args.out:
            raise SystemExit("error: give the output folder: out=DIR")
        if args.tiny:  # the budget scaled down; the stages the same
            args.corpus_mb, args.steps = min(args.corpus_mb, 0.5), min(args.steps, 3)
            args.held_out = max(args.held_out, 0.3)  # a few documents: hold out enough
            args.batch_size, args.seq_len = min(args.batch_size, 4), min(args.seq_len, 32)
        return args


@dataclass
class Stage:
    name: str
    status: str = "SKIP"  # PASS | FAIL | SKIP
    detail: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)


def run_stage(stages: list[Stage], name: str, fn, *args) -> Stage:
    stage = Stage(name)
    t0 = time.perf_counter()
    try:
        stage.status, stage.detail, stage.figures = fn(*args)
    except Exception as e:  # noqa: BLE001  a stage that crashes fails; the others still run
        stage.status, stage.detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    stage.seconds = round(time.perf_counter() - t0, 1)
    stages.append(stage)
    print(f"{name:12s} {stage.status}  {stage.detail}  [{stage.seconds:.0f} s]", flush=True)
    return stage


def skip_stage(stages: list[Stage], name: str, why: str) -> Stage:
    """A stage that cannot run because its input failed or was switched off: SKIP, and why."""
    stage = Stage(name, detail=why)
    stages.append(stage)
    print(f"{name:12s} SKIP  {why}", flush=True)
    return stage


def environment(args: Args):
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    figures = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
               "cuda": torch.version.cuda}
    ok = cuda or args.tiny
    return ("PASS" if ok else "FAIL"), (f"{device}, torch {torch.__version__}" if ok else
                                        "no CUDA device (tiny=true runs on CPU)"), figures


def wheels(out: Path):
    """gpu_run.sh writes wheels.txt: what it installed from wheels/, or why it did not."""
    note = out / "wheels.txt"
    if not note.is_file():
        return "SKIP", "no wheels.txt: run through scripts/gpu_run.sh to install wheels/", {}
    text = note.read_text().strip()
    return ("FAIL" if text.startswith("FAIL") else "PASS"), text.splitlines()[0][:200], {}


def checks(args: Args):
    import torch

    if not torch.cuda.is_available():
        return "SKIP", "no CUDA device", {}
    import gpu_check

    results = {}
    for check in gpu_check.CHECKS:
        t0 = time.perf_counter()
        try:
            line = check()
        except Exception as e:  # noqa: BLE001
            line = f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        results[check.__name__] = {"result": line, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"    {check.__name__:18s} {line}", flush=True)
    failed = [n for n, r in results.items() if r["result"].startswith("FAIL")]
    return ("FAIL" if failed else "PASS"), (f"failed: {', '.join(failed)}" if failed else
                                            f"{len(results)} checks"), results


def package_text_files() -> list[Path]:
    """Source and documentation files of the installed packages and the standard library."""
    roots = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib", "stdlib")}
    files = []
    for root in sorted(roots):
        if root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    return files


def gather_corpus(args: Args, out: Path):
    if args.corpus:
        src = Path(args.corpus)
        if not src.is_dir():
            return "FAIL", f"corpus={src} is not a folder", {}
        n = sum(1 for _ in src.rglob("*.txt"))
        return "PASS", f"{src} as given ({n} .txt documents)", {"corpus": str(src), "files": n}
    dest = out / "corpus"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    budget, total, n = int(args.corpus_mb * 2 ** 20), 0, 0
    for path in package_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        (dest / f"{n:07d}.txt").write_text(text, encoding="utf-8")  # one document per file
        total, n = total + len(text.encode()), n + 1
        if total >= budget:
            break
    args.corpus = str(dest)
    return "PASS", f"{n} files, {total / 2 ** 20:.1f} MB", {"files": n, "mb": total / 2 ** 20}


def looped_cli(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "looped", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def prepare(args: Args, out: Path):
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    proc = looped_cli("data", "prepare", f"corpus={args.corpus}", f"out={data}",
                      f"held_out={args.held_out}")
    if proc.returncode:
        return "FAIL", (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1], {}
    return "PASS", proc.stdout.strip().splitlines()[-1][:200], {"data": str(data)}


def bits_per_byte(run: Path) -> float:
    """The last evaluation's held-out bits per byte (each variant scores its own R only)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    (score,) = rows[-1]["eval"].values()
    return float(score["bits_per_byte"])


def train_pair(args: Args, out: Path, group: str):
    import torch

    gpu = torch.cuda.is_available()
    base = [*(TINY_MODEL if args.tiny else TEXT_MODEL), "task=text", f"task.data={out / 'data'}",
            f"task.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"train.eval_every={args.steps}", f"train.log_every={max(args.steps // 10, 1)}",
            "eval.n_samples=64" if args.tiny else "eval.n_samples=512",
            f"train.compile={'true' if gpu else 'false'}", f"out_dir={out / 'runs' / group}"]
    if not gpu:
        base.append("threads=1")
    scores, speed = {}, {}
    seeds = args.seeds if group == "text" else 1  # the looped pair: as the budget allows
    for seed in range(seeds):
        for variant, extra in VARIANTS[group].items():
            name = f"{variant}-seed{seed}"
            t0 = time.perf_counter()
            proc = looped_cli("train", *base, *extra, f"seed={seed}", f"name={name}",
                              timeout=None)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                return "FAIL", f"{name}: {last[:180]}", {"bits_per_byte": scores}
            scores.setdefault(variant, []).append(bits_per_byte(out / "runs" / group / name))
            tok_s = [ln.split("tok/s")[0].split()[-1] for ln in proc.stdout.splitlines()
                     if ln.startswith("step") and "tok/s" in ln]
            mfu = [ln.split("MFU")[1].split()[0] for ln in proc.stdout.splitlines()
                   if ln.startswith("step") and "MFU" in ln]
            speed[name] = {"seconds": round(time.perf_counter() - t0, 1),
                           "tok_s": float(tok_s[-1]) if tok_s else None,
                           "mfu": mfu[-1] if mfu else None}
            print(f"    {name:24s} bits/byte {scores[variant][-1]:.4f}  "
                  f"{speed[name]['tok_s']} tok/s  MFU {speed[name]['mfu']}", flush=True)
    ref, other = list(VARIANTS[group])
    diffs = [b - a for a, b in zip(scores[ref], scores[other])]
    mean = statistics.fmean(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    detail = (f"{other} - {ref}: {mean:+.4f} bits/byte over {len(diffs)} seeds "
              f"(per seed {', '.join(f'{d:+.4f}' for d in diffs)})")
    return "PASS", detail, {"bits_per_byte": scores, "paired_difference": diffs,
                            "mean_difference": mean, "sd_difference": spread, "runs": speed}


def write_report(out: Path, args: Args, stages: list[Stage]) -> None:
    payload = {"args": asdict(args), "stages": [asdict(s) for s in stages]}
    (out / "gpu_run.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# gpu_run", "", "| stage | status | detail | seconds |", "|---|---|---|---:|"]
    lines += [f"| {s.name} | {s.status} | {s.detail} | {s.seconds:.0f} |" for s in stages]
    for s in stages:
        if "bits_per_byte" in s.figures:
            n = len(next(iter(s.figures["bits_per_byte"].values())))
            lines += ["", f"## {s.name}: held-out bits per byte", "", s.detail, "",
                      "| variant | " + " | ".join(f"seed {k}" for k in range(n)) + " |",
                      "|---|" + "---:|" * n]
            lines += [f"| {v} | " + " | ".join(f"{x:.4f}" for x in xs) + " |"
                      for v, xs in s.figures["bits_per_byte"].items()]
    (out / "gpu_run.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    args = Args.parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "scripts"))
    stages: list[Stage] = []
    run_stage(stages, "environment", environment, args)
    run_stage(stages, "wheels", wheels, out)
    run_stage(stages, "checks", checks, args)
    corpus = run_stage(stages, "corpus", gather_corpus, args, out)
    prep = (run_stage(stages, "prepare", prepare, args, out) if corpus.status == "PASS"
            else skip_stage(stages, "prepare", "no corpus"))
    for group in ("text", "looped"):
        if group == "looped" and not args.looped_pair:
            skip_stage(stages, group, "looped_pair=false")
        elif prep.status != "PASS":
            skip_stage(stages, group, "no prepared data")
        else:
            run_stage(stages, group, train_pair, args, out, group)
    write_report(out, args, stages)
    print(f"wrote {out / 'gpu_run.json'} and {out / 'gpu_run.md'}")
    return sum(s.status == "FAIL" for s in stages)


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
