"""The command-line tools behind the `looped` command (cli.py): train, eval, study, bench, flops
and generate. The library (model, data, training, checkpoints, distributed) never imports them."""
