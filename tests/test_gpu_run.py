"""scripts/gpu_run.py, the first GPU run, on CPU: its tiny mode runs every stage on a node that
has only a typical GPU image's packages plus scripts/gpu_wheels.txt (everything else is made
unimportable, in this process's children too), and the wheel list covers the package's
third-party imports."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

# What a typical GPU node's image holds (the list), by import name.
NODE_IMAGE = {"torch", "triton", "transformers", "tokenizers", "tensorboard", "numpy",
              "safetensors", "matplotlib", "tqdm", "yaml"}
# Imported at module level only by modules no entry point of the run loads: lm-eval's model
# class (looped/integrations/lm_eval_model.py), which lm_eval itself imports.
OPTIONAL = {"lm_eval"}
DIST_TO_IMPORT = {"omegaconf": "omegaconf", "pyyaml": "yaml", "xformers": "xformers"}


def wheel_imports() -> set[str]:
    lines = (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()
    dists = [ln.split("==")[0].strip().lower() for ln in lines
             if ln.strip() and not ln.lstrip().startswith("#")]
    return {DIST_TO_IMPORT.get(d, d.replace("-", "_")) for d in dists}


def top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (module level, try blocks included; imports
    inside functions run only on the paths that use them)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        for sub in ast.walk(node) if isinstance(node, ast.Try) else [node]:
            if isinstance(sub, ast.Import):
                names |= {a.name.split(".")[0] for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                names.add(sub.module.split(".")[0])
    return names


def third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n != "looped"
            and n not in ("gpu_check", "__future__")}


def test_the_wheel_list_covers_every_import_a_bare_node_lacks():
    files = [*ROOT.glob("looped/**/*.py"), ROOT / "scripts" / "gpu_run.py",
             ROOT / "scripts" / "gpu_check.py", ROOT / "train.py"]
    needed = third_party(set().union(*(top_level_imports(f) for f in files)))
    assert "omegaconf" in needed and "torch" in needed  # the scan sees real imports
    missing = needed - NODE_IMAGE - wheel_imports() - OPTIONAL
    assert not missing, f"imported at module level but neither on the node nor in " \
                        f"scripts/gpu_wheels.txt: {sorted(missing)}"


def test_the_wheel_list_pins_versions_the_suite_runs():
    from importlib.metadata import version

    for line in (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            dist, sep, pinned = line.strip().partition("==")
            assert sep, f"{line}: pin an exact version"
            assert version(dist) == pinned, f"{dist}: the suite runs {version(dist)}"


# Installed here (the package's dependencies and dev extras) but not on a typical GPU node, and
# not in the wheel list: made unimportable for the tiny run.
NOT_ON_NODE = ("datasets", "pyarrow", "pandas", "dill", "multiprocess", "xxhash", "xformers",
               "lm_eval", "submitit", "accelerate", "evaluate", "sklearn", "nbclient", "pytest")


def _blocker(tmp_path: Path) -> Path:
    """A sitecustomize that swaps site-packages for a view of it without NOT_ON_NODE (symlinks
    to every other entry), in this interpreter and, through PYTHONPATH, in its subprocesses: the
    blocked packages are absent as on the node (find_spec says None, as torch's probes expect)."""
    import sysconfig

    assert not set(NOT_ON_NODE) & (NODE_IMAGE | wheel_imports())
    site_packages = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site-view"
    view.mkdir()
    for entry in site_packages.iterdir():
        top = entry.name.split(".")[0].split("-")[0]
        if top not in NOT_ON_NODE:
            (view / entry.name).symlink_to(entry)
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path[:] = [{str(view)!r} if p == {str(site_packages)!r} else p for p in sys.path]
    """))
    return site


@pytest.mark.slow
def test_tiny_mode_runs_every_stage_on_the_image_plus_the_wheels(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(12):  # documents of varied text; a few land in the held-out split
        (corpus / f"{k:02d}.txt").write_text(
            " ".join(f"word{(k * 7 + i) % 23} line {i}" for i in range(200)) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{_blocker(tmp_path)}{os.pathsep}{ROOT}",
           "OMP_NUM_THREADS": "1"}
    absent = subprocess.run([sys.executable, "-c", "import datasets"], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    assert absent.returncode != 0 and "No module named 'datasets'" in absent.stderr
    # one seed: each training is a subprocess (~5 s of start); seeds=2 is the same loop
    proc = subprocess.run([sys.executable, "scripts/gpu_run.py", f"out={out}", "tiny=true",
                           "seeds=1", f"corpus={corpus}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_run.json").read_text())
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {"environment": "PASS", "wheels": "SKIP", "checks": "SKIP",
                      "corpus": "PASS", "prepare": "PASS", "text": "PASS", "looped": "PASS"}
    text = next(s for s in report["stages"] if s["name"] == "text")["figures"]
    assert set(text["bits_per_byte"]) == {"vanilla", "depth_attention"}
    assert all(len(v) == 1 and 0 < v[0] < 20 for v in text["bits_per_byte"].values())
    want = [b - a for a, b in zip(text["bits_per_byte"]["vanilla"],
                                  text["bits_per_byte"]["depth_attention"])]
    assert text["paired_difference"] == pytest.approx(want)
    md = (out / "gpu_run.md").read_text()
    assert "| text | PASS |" in md and "| vanilla |" in md
    for line in ("environment", "corpus", "prepare", "text", "looped"):
        assert any(ln.startswith(line) and "PASS" in ln for ln in proc.stdout.splitlines()), line


def test_the_corpus_stage_gathers_installed_package_sources(tmp_path):
    from gpu_run import Args, gather_corpus

    args = Args.parse([f"out={tmp_path}", "corpus_mb=0.05"])
    status, detail, figures = gather_corpus(args, tmp_path)
    assert status == "PASS" and figures["files"] >= 1 and figures["mb"] >= 0.05
    docs = sorted((tmp_path / "corpus").glob("*.txt"))
    assert len(docs) == figures["files"] and all(d.read_text().strip() for d in docs)


@pytest.mark.parametrize("argv, fragment", [
    ([], "give the output folder"), (["out=x", "nope=1"], "unknown argument 'nope=1'")])
def test_bad_arguments_are_one_line(argv, fragment):
    from gpu_run import Args

    with pytest.raises(SystemExit) as err:
        Args.parse(argv)
    assert fragment in str(err.value) and "\n" not in str(err.value)
