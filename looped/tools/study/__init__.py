"""Multi-seed studies from one command: `python -m looped study configs/study/NAME.yaml`.

spec.py (the study file and its runs), runner.py (one run: train, resume or skip, then
evaluate), launchers.py (local N-at-a-time, submitit), stats.py (spread and t intervals),
aggregate.py (CSVs, markdown, figures)."""
