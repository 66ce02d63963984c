"""`python -m looped.study configs/study/NAME.yaml [key=value ...]`: the same as `looped study`
(looped.tools.study), under the name the study runner was first given."""

import sys

from looped.errors import cli_main
from looped.tools.cli import main

if __name__ == "__main__":
    cli_main(main, ["study", *sys.argv[1:]])
