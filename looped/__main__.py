"""`python -m looped SUBCOMMAND [key=value ...]`: the `looped` command (looped.tools.cli)."""

from looped.tools.cli import run

if __name__ == "__main__":
    run()
