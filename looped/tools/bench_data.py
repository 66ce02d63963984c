"""`looped bench data`: preparing and training on corpora of growing size, against the smallest.

    looped bench data sizes_mb=[20,2000] dir=/tmp/looped-bench-data

For each size it writes a synthetic corpus (text files of about `doc_mb` MB of random words,
reused when already there), prepares it into byte shards (`looped data prepare`, timed: MB/s),
then trains a tiny model on `task.data` for `steps` steps in a fresh process and reads that
process's peak resident memory. It prints each size's prepare throughput and its training peak
RSS as a ratio to the smallest size's: a reader whose memory does not grow with the corpus
keeps the ratio near 1.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from looped.config import parse_tool_args
from looped.config_help import tool_help
from looped.errors import ConfigError

WORDS = ("time love heart night light world life death hand eyes sweet fair king lord "
         "good true fear blood grace honour heaven soul speak think know gentle noble").split()
TINY_MODEL = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=1", "model.n_heads=4",
              "model.n_kv_heads=2", "model.head_dim=16", "model.ffn_dim=128",
              "model.max_seq_len=256", "loop=2", "task.seq_len=256"]


@dataclass
class BenchDataArgs:
    sizes_mb: list[int] = field(default_factory=lambda: [20, 2000])  # corpus sizes; the first is the baseline
    dir: str = "/tmp/looped-bench-data"  # corpora and shards are written (and reused) here
    doc_mb: float = 0.1  # size of each synthetic document (one .txt file)
    held_out: float = 0.05  # prepare's held-out fraction of documents
    workers: int = 0  # prepare's processes; 0: one per core
    steps: int = 50  # training steps on each corpus
    batch_size: int = 16  # training windows per step


def help_text(argv: list[str] = ()) -> str:
    return tool_help(__doc__, BenchDataArgs)


def synthetic_corpus(root: Path, size_mb: int, doc_mb: float, seed: int = 0) -> Path:
    """Files of random words until size_mb; kept (with a marker) for the next run."""
    done = root / ".complete"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per_doc = int(doc_mb * 1e6)
    n_docs = max(1, round(size_mb / doc_mb))
    shortest = min(map(len, WORDS)) + 1  # a word and its space
    for i in range(n_docs):
        text = " ".join(rng.choices(WORDS, k=per_doc // shortest + 1))[:per_doc - 1]
        (root / f"doc{i:06d}.txt").write_text(text + "\n")  # exactly per_doc bytes
    done.write_text("")
    return root


PEAK_TAG = "peak-rss-kb"
CHILD = """import resource, runpy, sys
sys.argv = ["looped"] + sys.argv[1:]
try:
    runpy.run_module("looped", run_name="__main__")
finally:
    print("%s", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
""" % PEAK_TAG


def peak_rss_mb(argv: list[str]) -> float:
    """Peak resident memory (MB) of a fresh `looped ARGV` process, as it reports it."""
    child = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    lines = child.stderr.strip().splitlines()
    if child.returncode != 0:
        cause = next((ln for ln in reversed(lines) if not ln.startswith(PEAK_TAG)), "?")
        raise ConfigError(f"training on the prepared corpus failed: {cause}")
    peak = next(ln for ln in reversed(lines) if ln.startswith(PEAK_TAG))
    return int(peak.split()[1]) / 1024


def main(argv: list[str]) -> int:
    from looped.data.prepare import PrepareArgs, prepare

    args: BenchDataArgs = parse_tool_args(BenchDataArgs, argv)
    if not args.sizes_mb or min(args.sizes_mb) < 1:
        raise ConfigError(f"sizes_mb must be a non-empty list of sizes >= 1, got {args.sizes_mb}")
    root = Path(args.dir).expanduser()
    rows = []
    for size in args.sizes_mb:
        corpus = synthetic_corpus(root / f"corpus_{size}mb", size, args.doc_mb)
        shards = root / f"shards_{size}mb"
        t0 = time.perf_counter()
        meta = prepare(PrepareArgs(corpus=str(corpus), out=str(shards), workers=args.workers,
                                   held_out=args.held_out))
        seconds = time.perf_counter() - t0
        mb_s = meta["bytes"] / 1e6 / meta["seconds"] if meta["seconds"] else float("nan")
        rss = peak_rss_mb(["train", "task=text", f"task.data={shards}", *TINY_MODEL,
                           f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                           f"train.eval_every={args.steps}", "eval.n_samples=64",
                           "eval.loops=[2]", f"out_dir={root / 'runs'}", f"name=size{size}",
                           "threads=1"])
        rows.append((size, meta["bytes"] / 1e6, mb_s, seconds, rss))
    base = rows[0][4]
    print(f"{'corpus':>10} {'text MB':>9} {'prepare MB/s':>13} {'train peak RSS MB':>18} "
          f"{'ratio to ' + str(rows[0][0]) + ' MB':>16}")
    for size, mb, mb_s, _, rss in rows:
        print(f"{size:>7} MB {mb:>9.0f} {mb_s:>13.1f} {rss:>18.0f} {rss / base:>16.3f}")
    return 0


if __name__ == "__main__":
    from looped.errors import cli_main

    cli_main(main, sys.argv[1:])
