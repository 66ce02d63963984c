"""Execute a notebook headless (nbclient, from the `dev` extra), printing its text output.

    python notebooks/run.py notebooks/loop_scaling.ipynb
    LOOPED_COMPARE_STEPS=250 LOOPED_FIG_DIR=docs/results/notebooks python notebooks/run.py notebooks/loop_scaling.ipynb

The notebook runs in its own folder, reads its LOOPED_* environment variables, and is not
modified: the stored copy stays without outputs.
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(path: str) -> int:
    nb_path = Path(path).resolve()
    if not nb_path.is_file():
        print(f"error: no notebook at {path}", file=sys.stderr)
        return 2
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(nb, timeout=None, kernel_name="python3",
                   resources={"metadata": {"path": str(nb_path.parent)}}).execute()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("name") == "stdout":
                print(out["text"], end="")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python notebooks/run.py NOTEBOOK.ipynb", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
