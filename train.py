"""Entry point: `python train.py loop=8 [key=value ...]`. See README.md for the config keys."""

import sys

from looped.errors import cli_main
from looped.tools.train import main

if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
