"""Bad input, systematically: every config key given a value of the wrong type, and every numeric
knob given a value out of its range, fails with a one-line ConfigError (the CLI: `error: ...`
on stderr, exit code 2), never a traceback or a silently accepted nonsense value.

The keys are enumerated from the schema (looped.config.Config, with each component slot's node
built for every registered component, looped.components.schema), so a new key is covered by the
wrong-type tests as soon as it exists, and a new numeric knob fails
test_every_numeric_knob_has_a_range_entry until it has a range check and an entry in RANGES.

A key is labelled by its path, and a component's own knob by its slot and component:
`task[phop].hops` is `task.hops` with `task.name=phop`; `task[phop].eval.hops` is its held-out
split (checked with the same values as `task[phop].hops`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, NamedTuple, Optional

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from looped import ConfigError, load_config
from looped.components import schema, slots
from looped.config import Config

ROOT = Path(__file__).resolve().parent.parent
# the recipe these cases were written on: the prefix-sums main job's state norm refuses the
# cross-layer methods, whose knobs are checked here too
ON_RECIPE = ("recipe=roots_staircase",)


# ---------------------------------------------------------------------------------------------
# The schema's leaves


class Leaf(NamedTuple):
    label: str  # "model.d_model", or "task[phop].hops" for a component's own knob
    path: str  # the dotted key: "task.hops"
    type: Any  # int | float | bool | str | list[...]
    optional: bool
    context: tuple[str, ...]  # the overrides that choose the component owning the key


def _unwrap(hint) -> tuple[Any, bool]:
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1, hint
        return args[0], True
    return hint, False


def _walk(cls: type, prefix: str, label: str, context: tuple[str, ...]):
    """Leaves and nodes of dataclass `cls` at `prefix`: (kind, Leaf), kind 'leaf' or 'node'; a
    slot's node is walked once per registered component, its shared fields once."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, lab = prefix + f.name, label + f.name
        hint, optional = _unwrap(hints[f.name])
        slot = slots().get(path)
        if slot is not None:
            yield "node", Leaf(path, path, hint, optional, ())
            base_fields = {b.name for b in dataclasses.fields(slot.base)}
            for component in slot.registry:
                node = schema(slot, component)
                choose = (f"{slot.path}.{slot.selector}={component}",)
                for kind, leaf in _walk(node, path + ".", f"{path}[{component}].", choose):
                    if leaf.path.split(".")[-1] in base_fields and leaf.path.count(".") == \
                            path.count(".") + 1:  # a shared field: once, by its path
                        leaf = leaf._replace(label=leaf.path, context=())
                    yield kind, leaf
        elif dataclasses.is_dataclass(hint):
            yield "node", Leaf(lab, path, hint, optional, context)
            yield from _walk(hint, path + ".", lab + ".", context)
        else:
            yield "leaf", Leaf(lab, path, hint, optional, context)


def _enumerate() -> tuple[list[Leaf], list[Leaf]]:
    leaves, nodes, seen = [], [], set()
    for kind, leaf in _walk(Config, "", "", ()):
        if leaf.label in seen:
            continue
        seen.add(leaf.label)
        (leaves if kind == "leaf" else nodes).append(leaf)
    return leaves, nodes


LEAVES, NODES = _enumerate()


def _is_numeric(t) -> bool:
    return t in (int, float) or (typing.get_origin(t) is list
                                 and typing.get_args(t)[0] in (int, float))


def _held_out_of(label: str) -> Optional[str]:
    """'task[phop].eval.hops' -> 'task[phop].hops': a held-out knob mirrors a training knob."""
    head, sep, knob = label.partition("].eval.")
    return f"{head}].{knob}" if sep and head.startswith("task[") else None


# ---------------------------------------------------------------------------------------------
# 1. Wrong types: a string for a number or a flag, a list for a scalar, a scalar for a list,
# a scalar for a node (every key; a held-out knob task[x].eval.k, built from its training knob
# by one function, gets the first value only), and a few more kinds on a sample of keys (each
# load costs ~40 ms, so not every kind on every key).

WRONG = {
    int: ("abc", "[1]"),
    float: ("abc", "[1.0]"),
    bool: ("maybe", "[true]"),  # OmegaConf reads 0/1 (any int) as a flag: not tested as wrong
    str: ("[a,b]",),
    list[int]: ("abc", "[a]", "[[1]]"),
    list[float]: ("abc", "[a]", "[[1.0]]"),
    list[str]: ("{a: 1}", "[[a]]"),
}


# more kinds of wrong values, on a sample: null for a key that is not Optional (a selector's
# null: see LOADER_CASES), a fraction for an int, a mapping for a scalar
SAMPLED = {
    "loop": ("null", "1.5", "{a: 1}"),
    "train.lr": ("null", "{a: 1}"),
    "resume": ("null",),
    "device": ("null", "{a: 1}"),
    "eval.loops": ("null", "[1.5]", "[true]"),
    "imports": ("null",),
    "model.mla.kv_rank": ("null", "1.5"),
    "exit.drop_rows_from": ("null", "1.5"),
    "task[phop].hops": ("null", "1.5", "{a: 1}"),
    "task[phop].eval.hops": ("1.5", "{a: 1}"),
    "exit[kl].threshold": ("null", "{a: 1}"),
    "model.cross_layer[denseformer].dilation": ("1.5",),
}


def _wrong_type_cases() -> list:
    cases = []
    for leaf in LEAVES:
        values = WRONG.get(leaf.type)
        if values is None:
            cases.append(pytest.param(leaf, None, id=f"{leaf.label}:unknown-type"))
            continue
        if _held_out_of(leaf.label):
            values = values[:1]
        for value in (*values, *SAMPLED.get(leaf.label, ())):
            cases.append(pytest.param(leaf, value, id=f"{leaf.label}={value}"))
    return cases


def _one_line_error(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        load_config([*ON_RECIPE, *overrides])
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("leaf, value", _wrong_type_cases())
def test_a_wrong_type_is_a_one_line_error_naming_the_key(leaf, value):
    assert value is not None, (f"{leaf.label} has type {leaf.type}: add its wrong values to "
                               f"WRONG in {Path(__file__).name}")
    message = _one_line_error([*leaf.context, f"{leaf.path}={value}"])
    assert leaf.path in message, message


@pytest.mark.parametrize("node", [pytest.param(n, id=n.label) for n in NODES])
@pytest.mark.parametrize("value", ["3", "[1]"])
def test_a_scalar_or_list_for_a_node_is_a_one_line_error(node, value):
    message = _one_line_error([*node.context, f"{node.path}={value}"])
    assert node.path in message, message


# ---------------------------------------------------------------------------------------------
# 2. Ranges: every numeric knob, by label -> Range(bad values, a good value, the overrides the
# rule needs), or Unbounded(why). A held-out knob (task[x].eval.k) is checked with its training
# knob's entry. Floats are also checked against nan and inf below.


class Range(NamedTuple):
    bad: tuple[str, ...]
    good: str
    context: tuple[str, ...] = ()


class Unbounded(NamedTuple):
    """A numeric knob that accepts any value of its type (say why in `reason`)."""
    reason: str


MLA = ("model.attention=mla",)  # model.mla.* is checked only when it is used
LOOP8 = ("loop=8",)

RANGES: dict[str, Range | Unbounded] = {
    "loop": Range(("0",), "1"),
    "seed": Range((str(2 ** 63), str(-2 ** 63 - 1)), "-1"),  # torch takes 64-bit seeds only
    "threads": Range(("-1", "65537"), "0"),
    "model.vocab_size": Range(("0",), "1"),
    "model.d_model": Range(("0",), "1"),
    "model.n_layers": Range(("0",), "1"),
    "model.n_prelude": Range(("-1",), "0"),
    "model.n_coda": Range(("-1",), "0"),
    "model.n_heads": Range(("0", "3"), "2", ("model.n_kv_heads=2",)),  # 3: not divisible
    "model.n_kv_heads": Range(("0", "3"), "1", ("model.n_heads=4",)),
    "model.head_dim": Range(("0", "7"), "2"),  # even for RoPE
    "model.ffn_dim": Range(("0",), "1"),
    "model.rope_theta": Range(("0",), "500000.0"),
    "model.max_seq_len": Range(("0",), "1"),
    "model.attn_window": Range(("-1",), "0"),  # 0: full causal attention
    "model.norm_eps": Range(("0",), "1.0e-5"),
    "model.init_std": Range(("0",), "1.0"),
    "model.mla.kv_rank": Range(("0",), "1", MLA),
    "model.mla.q_rank": Range(("-1",), "0", MLA),
    "model.mla.nope_dim": Range(("0",), "1", MLA),
    "model.mla.rope_dim": Range(("0", "3"), "2", MLA),
    "model.mla.v_dim": Range(("0",), "1", MLA),
    "model.depth_attention[strided].stride": Range(("0",), "1"),
    "model.depth_attention[strided].window": Range(("-1",), "0"),
    "model.depth_attention[window].window": Range(("0",), "1"),  # iterations, at least one
    "model.depth_attention[anchor_window].window": Range(("0",), "1"),
    "model.depth_attention[loop_strided].stride": Range(("0",), "1"),
    "model.cross_layer.param_loops": Range(("-1", "7"), "8", LOOP8),  # 0 or >= loop
    "model.cross_layer[denseformer].dilation": Range(("0",), "1"),
    "model.cross_layer[denseformer].period": Range(("0",), "1"),
    "model.cross_layer[attn_res].block_size": Range(("-1",), "0"),
    "model.cross_layer[mhc].streams": Range(("1", "65"), "2"),
    "model.cross_layer[mhc].sinkhorn_iters": Range(("0",), "1"),
    "model.cross_layer[hyper_connections].streams": Range(("1", "65"), "64"),
    "train.steps": Range(("0",), "1"),
    "train.batch_size": Range(("0",), "1"),
    "train.lr": Range(("0",), "1.0e-4"),
    "train.weight_decay": Range(("-0.1",), "0"),
    "train.warmup_steps": Range(("-1",), "0"),
    "train.warmup_fraction": Range(("-0.1", "1"), "0.5"),  # in [0, 1)
    "train.grad_clip": Range(("-1",), "0"),
    "train.log_every": Range(("0",), "1"),
    "train.grad_loops": Range(("-1",), "0"),
    "train.gate_beta": Range(("-1",), "0"),
    "train.eval_every": Range(("0",), "1"),
    "train.keep_checkpoints": Range(("0",), "1"),
    "train.loop_sampling[uniform].min_loops": Range(("0", "9"), "8", LOOP8),  # in [1, loop]
    "train.loop_sampling[poisson_lognormal].min_loops": Range(("0", "9"), "1", LOOP8),
    "train.loop_sampling[poisson_lognormal].mean": Range(("-1",), "0"),
    "train.loop_sampling[poisson_lognormal].sigma": Range(("-0.5",), "0"),
    "train.loop_sampling[poisson_lognormal].cap": Range(("-1", "2"), "3",
                                                        ("train.loop_sampling.min_loops=3",)),
    "train.objective[progressive].alpha": Range(("-0.1", "1.5"), "1"),
    "task[roots].n_chains": Range(("0",), "1"),
    "task[roots].chain_len": Range(("1",), "2"),
    "task[roots].n_queries": Range(("0",), "1"),
    "task[chain].hops": Range(("0",), "1"),
    "task[chain].n_distractors": Range(("-1",), "0"),
    "task[chain].statements": Range(("-1", "3"), "4", ("task.hops=4",)),  # 0 or >= hops
    "task[chain].min_hops": Range(("-1", "5"), "2", ("task.hops=4",)),
    "task[chain].loops_per_hop": Range(("-1",), "0"),
    "eval.grid.n_samples": Range(("0",), "1"),
    "eval.grid.levels": Unbounded("values of the task's eval.grid.knob: the task's own check "
                                  "rejects a bad one when the grid is built (train, looped eval)"),
    "task[phop].hops": Range(("0", "63"), "62", ("task.length=64",)),  # length >= hops + 2
    "task[phop].length": Range(("5",), "6", ("task.hops=4",)),
    "task[phop].alphabet": Range(("1",), "2"),
    "task[phop].min_hops": Range(("-1", "5"), "2", ("task.hops=4", "task.loops_per_hop=1")),
    "task[phop].loops_per_hop": Range(("-1",), "0"),
    "task[addition].digits": Range(("0",), "1"),
    "task[text].seq_len": Range(("0",), "1"),
    "task[text].bpe_vocab": Range(("255",), "256", ("task.tokenizer=bpe",)),
    "task[text].held_out": Range(("-0.1", "1"), "0"),  # in [0, 1)
    "task[prefix_sums].length": Range(("0",), "1", ("task.min_length=0",)),
    "task[prefix_sums].min_length": Range(("-1", "17"), "16", ("task.length=16",)),
    "task[prefix_sums].loops_per_bit": Range(("-1",), "0"),
    "exit.drop_rows_from": Range(("-1",), "0"),
    "exit[kl].threshold": Range(("0",), "1.0e-6"),
    "exit[entropy].threshold": Range(("0",), "1.0e-6"),
    "exit[latent].threshold": Range(("0",), "1.0e-6"),
    "exit[gate].threshold": Range(("0", "1.01"), "1", ("model.exit_gate=true",)),  # (0, 1]
    "exit[max_loops].after": Range(("0",), "1"),
    "eval.loops": Range(("[0]", "[1,-1]"), "[1,16]"),
    "eval.n_samples": Range(("0",), "1"),
    "eval.batch_size": Range(("-1",), "0"),  # 0: what fits in memory
    "train.micro_batch_size": Range(("-1", "999"), "0"),  # at most train.batch_size
}

NUMERIC = [leaf for leaf in LEAVES if _is_numeric(leaf.type)]


def _range_of(leaf: Leaf):
    return RANGES.get(_held_out_of(leaf.label) or leaf.label)


def test_every_numeric_knob_has_a_range_entry():
    labels = {leaf.label for leaf in NUMERIC if _held_out_of(leaf.label) is None}
    missing = sorted(labels - RANGES.keys())
    assert not missing, (f"numeric knobs without a range entry: {', '.join(missing)}; give each "
                         f"a range check (config.validate or its Config.check) and a RANGES "
                         f"entry in {Path(__file__).name}, or mark it Unbounded with a reason")
    stale = sorted(RANGES.keys() - labels)
    assert not stale, f"RANGES names keys the schema no longer has: {', '.join(stale)}"
    # every Range entry carries a bad value
    assert all(isinstance(r, Unbounded) or r.bad for r in RANGES.values())


def _range_cases(which: str) -> list:
    cases = []
    for leaf in NUMERIC:
        rng = _range_of(leaf)
        if not isinstance(rng, Range):
            continue  # Unbounded; a missing entry fails the completeness test
        for value in rng.bad if which == "bad" else (rng.good,):
            cases.append(pytest.param(leaf, rng, value, id=f"{leaf.label}={value}"))
    return cases


@pytest.mark.parametrize("leaf, rng, value", _range_cases("bad"))
def test_a_value_out_of_range_is_a_one_line_error(leaf, rng, value):
    message = _one_line_error([*leaf.context, *rng.context, f"{leaf.path}={value}"])
    assert leaf.path.rsplit(".", 1)[-1] in message, message


@pytest.mark.parametrize("leaf, rng, value", _range_cases("good"))
def test_the_good_value_of_each_range_is_accepted(leaf, rng, value):
    cfg = load_config([*ON_RECIPE, *leaf.context, *rng.context, f"{leaf.path}={value}"])
    got = OmegaConf.select(cfg, leaf.path)
    want = OmegaConf.from_dotlist([f"v={value}"]).v
    if OmegaConf.is_list(got):
        assert list(got) == list(want)
    else:
        assert float(got) == float(want)


def _non_finite_cases() -> list:
    return [pytest.param(leaf, value, id=f"{leaf.label}={value}")
            for leaf in NUMERIC if leaf.type is float and isinstance(_range_of(leaf), Range)
            for value in ("nan", "inf")]


@pytest.mark.parametrize("leaf, value", _non_finite_cases())
def test_a_float_knob_rejects_nan_and_inf(leaf, value):
    message = _one_line_error([*leaf.context, *_range_of(leaf).context, f"{leaf.path}={value}"])
    assert leaf.path.rsplit(".", 1)[-1] in message, message


def test_the_enumeration_sees_every_component():
    """The leaves cover each registered component's own knobs and the held-out split."""
    labels = {leaf.label for leaf in LEAVES}
    for slot in slots().values():
        for component, knobs in slot.registry.configs.items():
            for f in dataclasses.fields(knobs):
                assert f"{slot.path}[{component}].{f.name}" in labels or \
                    f"{slot.path}.{f.name}" in labels, (slot.path, component, f.name)
    assert "task[phop].eval.hops" in labels and "model.mla.kv_rank" in labels
    assert not SAMPLED.keys() - labels, sorted(SAMPLED.keys() - labels)


# ---------------------------------------------------------------------------------------------
# Loader-level bad input: a null selector, OmegaConf's MISSING (???) and dangling or recursive
# interpolations. Each used to escape as a traceback or be accepted silently.


def _loader_case(overrides, bug):
    return pytest.param(overrides, id=" ".join(overrides))


LOADER_CASES = [
    *(_loader_case([f"{s.path}.{s.selector}=null"], "a null selector reached schema(): TypeError")
      for s in slots().values() if not _unwrap(typing.get_type_hints(s.base)[s.selector])[1]),
    _loader_case(["train.lr=???"], "OmegaConf's MISSING escaped validate()"),
    _loader_case(["train.lr=${nope}"], "a dangling interpolation escaped validate()"),
    _loader_case(["loop=${loop}"], "a recursive interpolation escaped as a traceback"),
    _loader_case(["out_dir=???"], "MISSING in a str key was accepted, failing later"),
]


@pytest.mark.parametrize("overrides", LOADER_CASES)
def test_loader_level_bad_input_is_one_line(overrides):
    _one_line_error(overrides)


# ---------------------------------------------------------------------------------------------
# 3. End to end: the real CLI prints one `error:` line and exits 2 (each run ~2 s of start-up).


@pytest.mark.parametrize("arg, key", [
    ("model.d_model=abc", "model.d_model"),  # a wrong type
    ("eval.batch_size=-1", "eval.batch_size"),  # out of range
])
def test_cli_bad_value_exits_2_with_one_error_line(arg, key, tmp_path):
    argv = [sys.executable, "train.py", arg, "train.steps=1", f"out_dir={tmp_path}"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert key in lines[0] and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was written
