"""`looped bench NAME [key=value ...]`: benchmarks that report ratios against a baseline timed in
the same run (never absolute speeds alone).

    looped bench depth                 # Depth-Attention vs vanilla: train step (plain, looped)
    looped bench decode                # decode tok/s eager and compiled vs the bandwidth bound
    looped bench loop ckpt=runs/main   # a looped run: adaptive exit vs fixed R, cache vs recompute
    looped bench cache ckpt=[runs/a,runs/b]  # cache policies: bytes and held-out quality vs R
    looped bench data sizes_mb=[20,2000]     # prepare MB/s; training RSS against corpus size
"""

from __future__ import annotations

import importlib

from looped.errors import ConfigError

BENCHES = {"depth": "looped.tools.bench_depth", "loop": "looped.tools.bench_loop",
           "cache": "looped.tools.bench_cache", "decode": "looped.tools.bench_decode",
           "data": "looped.tools.bench_data"}


def _bench(argv: list[str]):
    if not argv or argv[0] not in BENCHES:
        got = f"'{argv[0]}'" if argv else "none"
        raise ConfigError(f"name the benchmark first, got {got}; choose one of: "
                          f"{', '.join(BENCHES)}")
    return importlib.import_module(BENCHES[argv[0]])


def help_text(argv: list[str] = ()) -> str:
    if argv and argv[0] in BENCHES:
        return _bench(argv).help_text()
    return __doc__.strip() + "\n\n`looped bench NAME --help` lists NAME's keys."


def main(argv: list[str]) -> int:
    return _bench(argv).main(argv[1:])
