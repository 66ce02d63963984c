"""Typed configuration: OmegaConf structured dataclasses, YAML presets, CLI dotlist overrides.

`load_config(["loop=8", "model=small", "model.d_model=256"])` resolves exactly as `train.py` does:
  1. the dataclass defaults below,
  2. configs/defaults.yaml (the main job), or the whole-run recipe `recipe=NAME` names
     (configs/recipe/NAME.yaml, e.g. recipe=roots_staircase) in its place,
  3. preset selections `group=name` (configs/<group>/<name>.yaml), in the order given,
  4. dotlist overrides `a.b=value`, in the order given,
then validates ranges and shapes. Every problem raises `ConfigError` with a one-line message.

Five nodes hold a component chosen by name (the task, the depth source policy, the cross-layer
method, the loop sampler, the exit criterion); each node's schema is its shared fields below plus
the chosen component's own knobs, declared next to the component (looped.components). Choosing
another task preset replaces the earlier preset's task knobs.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from looped.data.base import TaskConfig
from looped.errors import ConfigError
from looped.model.attention import ATTENTION_KINDS
from looped.model.cross_layer import CrossLayerConfig
from looped.model.depth import DepthAttentionConfig
from looped.model.exit import ExitConfig
from looped.model.kernels import KERNELS
from looped.model.mla import MLAConfig
from looped.model.parallelize import CHECKPOINTING_MODES
from looped.model.recurrence import INIT_STATES, INJECTIONS
from looped.training.device import DEVICES
from looped.training.loop_sampling import LoopSamplingConfig
from looped.training.losses import ObjectiveConfig
from looped.training.scoring import EvalConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# The nodes that hold a component chosen by name (task, model.depth_attention, model.cross_layer,
# train.loop_sampling, train.objective, exit) take their shared fields from the dataclass beside the
# component's registry, and the chosen component's knobs (looped.components).


@dataclass
class ModelConfig:
    vocab_size: int = 256  # >= the task's vocabulary (256 for byte-level text)
    d_model: int = 128  # residual width
    n_layers: int = 2  # layers in the core block; a plain decoder is just the core with loop=1
    n_prelude: int = 0  # untied layers before the core
    n_coda: int = 0  # untied layers after the core
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (GQA); divides n_heads
    head_dim: int = 32  # per head; even (RoPE)
    ffn_dim: int = 384  # SwiGLU hidden width
    rope_theta: float = 10000.0  # RoPE base
    # learned absolute position embedding added to the token embedding (not in Qwen3; pointer
    # tasks that address tokens by absolute position need it)
    pos_embedding: bool = False
    max_seq_len: int = 256  # longest sequence (prompt + generated) the model accepts
    # sliding-window sequence attention: each query reads its last attn_window keys (itself
    # included), a local prior like Deep Thinking's convolutions; 0: every earlier key
    attn_window: int = 0
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # the head reuses the token embedding
    kernel: str = "sdpa"  # sdpa | eager | xformers
    attention: str = "gqa"  # gqa (n_kv_heads, head_dim) | mla (multi-head latent: model.mla)
    mla: MLAConfig = field(default_factory=MLAConfig)
    share_weights: bool = True  # false: the core becomes `loop` untied copies (unrolled baseline)
    injection: str = "add"  # how the prelude output e enters each iteration: add | concat | none
    init_state: str = "zeros"  # the state before the first iteration: zeros | embed | noise
    # RMS-normalise the state after every iteration (a learned gain, starting at init_std): a
    # bounded recurrence, as Labovich 2026 uses for prefix sums
    state_norm: bool = False
    init_std: float = 0.02  # std of the weight init (residual outputs scaled down by depth)
    exit_gate: bool = False  # a learned halting probe on the state (exit criterion 'gate')
    depth_attention: DepthAttentionConfig = field(default_factory=DepthAttentionConfig)
    cross_layer: CrossLayerConfig = field(default_factory=CrossLayerConfig)


CHECKPOINT_FORMATS = ("full", "sharded")


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 64  # sequences per step (global under torchrun)
    lr: float = 2e-3  # peak learning rate (AdamW, betas 0.9 / 0.95)
    weight_decay: float = 0.1  # on weight matrices only (looped.training.optim)
    warmup_steps: int = 20  # linear warmup, then a cosine to 10% of lr
    warmup_fraction: Optional[float] = None  # warmup as a fraction of steps; set, it wins
    grad_clip: float = 1.0  # global gradient-norm clip; 0: none
    log_every: int = 10  # print a training line every N steps
    # how many iterations each step runs: the sampler and its knobs (`loops` elsewhere is always
    # a loop count, or a list of them)
    loop_sampling: LoopSamplingConfig = field(default_factory=LoopSamplingConfig)
    grad_loops: int = 0  # truncated backprop: only the last k iterations carry gradient; 0: all
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    gate_beta: float = 0.01  # entropy bonus of the exit-gate loss (model.exit_gate=true)
    compile: bool = False  # torch.compile the training forward (first steps pay the compile)
    # recompute activations in backward: none | iteration (keeps one state per loop iteration)
    # | block (one input per layer); see looped.model.parallelize.apply_activation_checkpointing
    activation_checkpointing: str = "none"
    # gradient accumulation: rows per forward/backward (of each rank's batch); 0: all at once.
    # The losses are weighted by answer tokens, so the step equals one over the whole batch
    micro_batch_size: int = 0
    # a NaN/Inf loss or gradient stops the run (exit code 3); true skips the step and counts it
    skip_nonfinite: bool = False
    eval_every: int = 100  # held-out evaluation (and a checkpoint) every N steps
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    # full: weights and optimizer gathered into one model.safetensors + state.pt (rank 0 writes);
    # sharded: torch.distributed.checkpoint, every rank writes its shards, resumable on any
    # number of ranks (looped.training.sharded_checkpoint)
    checkpoint_format: str = "full"
    async_checkpoint: bool = False  # sharded only: write in the background while training goes on
    # data parallelism under torchrun (world size > 1): ddp | fsdp (FSDP2); batch_size is global
    parallel: str = "ddp"


@dataclass
class Config:
    # the user's modules (names or .py paths) that register components; see looped.plugins
    imports: list[str] = field(default_factory=list)
    loop: int = 4  # R: iterations of the core block
    seed: int = 0  # initial weights, data order and loop counts
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    device: str = "auto"  # auto (CUDA if available, else CPU) | cpu | cuda
    out_dir: str = "runs"  # runs are written to <out_dir>/<name>
    name: Optional[str] = None  # None: a name from the time and the loop count
    resume: bool = False  # continue the run <out_dir>/<name> from its latest checkpoint
    resume_from: Optional[str] = None  # or continue from this checkpoint (run dir or ckpt dir)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    exit: ExitConfig = field(default_factory=ExitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# configs/study/ holds study files (`looped study`); configs/recipe/ whole-run recipes (recipe=)
NOT_PRESETS = ("study", "recipe")


def preset_groups() -> list[str]:
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in NOT_PRESETS)


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), full + "."))
    return keys


# Keys that were renamed, so an old command or config gets a pointer, not a guess.
RENAMED = {
    "model.cross_layer.max_loops": "model.cross_layer.param_loops",
    "train.loops.max_loops": "train.loop_sampling.cap",
    "exit.max_loops": "exit.after",
    "train.loss": "train.objective.loss",
    # a node: every key under it moves (after the renames of its own keys above)
    "train.loops": "train.loop_sampling",
}


def renamed_key(key: str) -> Optional[str]:
    """The key that replaced an old one (a renamed key, or a key under a renamed node), or
    None when `key` was never renamed."""
    for old, new in RENAMED.items():
        if key == old:
            return new
        if key.startswith(old + "."):
            return new + key[len(old):]
    return None


def renamed_override(item: str) -> str:
    """`old.key=value` as today's `new.key=value`; any other override as it is."""
    key, sep, value = item.partition("=")
    new = renamed_key(key) if sep else None
    return f"{new}={value}" if new else item


def _unknown_key_message(cfg: DictConfig, key: str) -> str:
    from looped.components import unknown_knob_hint

    new = renamed_key(key)
    if new is not None:
        return f"config key '{key}' is now '{new}'"
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    own = unknown_knob_hint(key, cfg)
    return f"unknown config key '{key}'{own}{hint}"


def load_yaml(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry multi-line context; keep the first line
        raise ConfigError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping")
    return node


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"{source}: {_unknown_key_message(cfg, key)}") from None
    except ValidationError as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{source}: {first_line(e)}{f' (key {key})' if key else ''}") from None


def first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def _plugins_of(overrides) -> list[str]:
    """The modules an `imports=[...]` override names (imported before anything resolves)."""
    names: list[str] = []
    for item in overrides:
        if item.startswith("imports="):
            try:
                value = OmegaConf.from_dotlist([item]).imports
            except Exception as e:  # a malformed list: yaml's parser errors
                raise ConfigError(f"bad value in '{item}': {first_line(e)}") from None
            # a mapping is no module name: the schema reports it
            names = (list(value) if OmegaConf.is_list(value) else
                     [] if OmegaConf.is_dict(value) else [str(value)])
    return names


def _schema(loose: DictConfig) -> DictConfig:
    """The structured config whose component nodes have the schema of the components a loosely
    merged config chooses (looped.components)."""
    from looped.components import schema, slots

    chosen = tuple((slot.path, schema(slot, slot.component(loose))) for slot in slots().values())
    return copy.deepcopy(_schema_of(chosen))


@functools.lru_cache(maxsize=64)
def _schema_of(chosen: tuple[tuple[str, type], ...]) -> DictConfig:
    """The structured config with each (slot path, node dataclass) of `chosen`. Cached: building
    it is most of a config's resolution, and a config's choices repeat (callers get a copy)."""
    cfg = OmegaConf.structured(Config)
    for path, node in chosen:
        parent_path, _, leaf = path.rpartition(".")
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
        setattr(parent, leaf, OmegaConf.structured(node))
    return cfg


@functools.lru_cache(maxsize=1)
def _defaults_container() -> dict:
    """Config's defaults as plain containers (callers get a copy)."""
    return OmegaConf.to_container(OmegaConf.structured(Config))


def _loose(sources: list[DictConfig], dotlist: list[str]) -> DictConfig:
    """Every source merged without a schema: only to read which components are chosen."""
    loose = OmegaConf.create(copy.deepcopy(_defaults_container()))
    for node in sources:
        try:
            loose = OmegaConf.merge(loose, node)
        except (OmegaConfBaseException, TypeError):  # e.g. `task: [1]`
            pass  # reported against the schema later
    for item in dotlist:
        try:
            loose.merge_with_dotlist([item])
        except OmegaConfBaseException:
            pass  # reported against the schema later
    return loose


def _resolve(sources: list[tuple[str, DictConfig]], dotlist: list[str]) -> DictConfig:
    cfg = _schema(_loose([node for _, node in sources], dotlist))
    for label, node in sources:
        cfg = _merge(cfg, node, label)
    cfg = _apply_dotlist(cfg, dotlist)
    # plugin files by absolute path, so a saved run finds them from any directory
    cfg.imports = [str(Path(n).expanduser().resolve()) if str(n).endswith(".py") else n
                   for n in cfg.imports]
    try:  # ${...} references: resolved once, here, so a bad one is a one-line error
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"cannot resolve {f'{key}' if key else 'the config'}: "
                          f"{first_line(e)}") from None
    if missing:
        raise ConfigError(f"config key '{missing[0]}' is left without a value (???)")
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def _preset(group: str, value: str) -> DictConfig:
    """`group=value`: configs/<group>/<value>.yaml, or, for a group that is also a component
    slot (task), a registered component without a preset file (a plugin's)."""
    from looped.components import slots

    if value in presets(group):
        return OmegaConf.create({group: load_yaml(CONFIG_DIR / group / f"{value}.yaml")})
    slot = slots().get(group)
    if slot is not None and value in slot.registry:
        return OmegaConf.create({group: {slot.selector: value}})
    registered = f"; or a registered {slot.kind}: {', '.join(slot.registry)}" if slot else ""
    raise ConfigError(f"unknown {group} preset '{value}'; choose one of: "
                      f"{', '.join(presets(group))}{registered}")


def _without(node: DictConfig, path: str) -> DictConfig:
    """node without the key at a dotted path (a copy; node itself where it has no such key)."""
    *parents, last = path.split(".")
    inner = node
    for key in parents:
        inner = inner.get(key) if isinstance(inner, DictConfig) else None
    if not isinstance(inner, DictConfig) or last not in inner:
        return node
    node = copy.deepcopy(node)
    inner = node
    for key in parents:
        inner = inner[key]
    inner.pop(last)
    return node


def _switched_slots(sources, dotlist) -> list[str]:
    """The slots whose component a dotlist override changes from the one the sources choose
    (`task.name=chain` over a default prefix_sums): the sources' knobs of that slot belong to
    the other component and are dropped, as choosing a preset drops them."""
    from looped.components import slots

    chosen = {item.split("=", 1)[0]: item.split("=", 1)[1] for item in dotlist}
    try:
        merged = OmegaConf.merge(*[node for _, node in sources]) if sources else None
    except OmegaConfBaseException:  # reported against the schema later
        return []
    switched = []
    for slot in slots().values():
        value = chosen.get(f"{slot.path}.{slot.selector}")
        if value is not None and merged is not None and value != slot.component(merged):
            switched.append(slot)
    return switched


def _without_task_grid(node: DictConfig, switched: str) -> DictConfig:
    """Choosing another task drops an earlier source's eval.grid too: its knob and levels are
    the other task's (the main job's grid is over prefix sums' lengths)."""
    return _without(node, "eval.grid") if switched == "task" else node


def _without_knobs(node: DictConfig, slot) -> DictConfig:
    """node without the component knobs of a slot (its shared fields, e.g. `enabled`, stay)."""
    inner = OmegaConf.select(node, slot.path, default=None)
    if not isinstance(inner, DictConfig):
        return node
    shared = {f.name for f in dataclasses.fields(slot.base)}
    for key in [k for k in inner.keys() if k not in shared]:
        node = _without(node, f"{slot.path}.{key}")
    return node


def _check_dotlist(overrides) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Resolve the config exactly as `python train.py <overrides>` does, then validate it."""
    from looped.components import slots
    from looped.plugins import import_plugins

    import_plugins(_plugins_of(overrides))
    _check_dotlist(overrides)
    sources = []
    defaults = _defaults_file(overrides)
    if defaults.is_file():
        sources.append((str(defaults), load_yaml(defaults)))
    groups = set(preset_groups())
    dotlist = []
    for item in overrides:
        key, value = item.split("=", 1)
        if key == RECIPE:  # read above, in place of the built-in defaults
            continue
        if key in groups:
            if key in slots():  # choosing another component replaces the earlier one's knobs
                sources = [(label, _without(_without_task_grid(node, key), key))
                           for label, node in sources]
            sources.append((f"preset {key}={value}", _preset(key, value)))
        else:
            dotlist.append(item)
    for slot in _switched_slots(sources, dotlist):
        sources = [(label, _without_knobs(_without_task_grid(node, slot.path), slot))
                   for label, node in sources]
    return _resolve(sources, dotlist)


RECIPE = "recipe"  # recipe=NAME: configs/recipe/NAME.yaml stands in for configs/defaults.yaml


def recipes() -> list[str]:
    return presets(RECIPE)


def named_recipes(overrides) -> list[str]:
    """The recipes `recipe=NAME` overrides name, in order."""
    return [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0] == RECIPE]


def _defaults_file(overrides) -> Path:
    """configs/defaults.yaml (the main job's recipe), or the whole-run recipe an override names:
    a recipe sets every default a run's task, model and training need, so it replaces the
    built-in defaults rather than merging with them."""
    named = named_recipes(overrides)
    if not named:
        return CONFIG_DIR / "defaults.yaml"
    if len(set(named)) > 1:
        raise ConfigError(f"recipe= names {len(set(named))} recipes ({', '.join(named)}); a run "
                          f"has one")
    if named[0] not in recipes():
        raise ConfigError(f"unknown recipe '{named[0]}'; choose one of: {', '.join(recipes())}")
    return CONFIG_DIR / RECIPE / f"{named[0]}.yaml"


def load_run_config(run_dir: Path, overrides: Optional[list[str]] = None) -> DictConfig:
    """The config a run was trained with (its config.yaml), with optional dotlist overrides."""
    return load_config_file(Path(run_dir) / "config.yaml", overrides or [])


def load_config_file(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """A saved, resolved config (a run's config.yaml) with dotlist overrides, validated."""
    from looped.plugins import import_plugins

    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    saved = load_yaml(Path(path))
    imports = saved.get("imports", [])  # any other type is reported against the schema
    import_plugins([*(imports if OmegaConf.is_list(imports) else []), *_plugins_of(overrides)])
    _check_dotlist(overrides)
    return _resolve([(str(path), _migrate(saved))], list(overrides))


# The component knobs every config held before each component declared its own (looped.components),
# by node: a run saved then carries all of them, whichever component it chose.
_FLAT_KNOBS = {
    "task": {"n_chains", "chain_len", "n_queries", "hops", "n_distractors", "length", "alphabet",
             "min_hops",
             "digits", "corpus", "text_field", "seq_len", "tokenizer", "bpe_vocab", "held_out"},
    "model.depth_attention": {"stride", "window"},
    "model.cross_layer": {"dilation", "period", "learnable", "block_size", "streams",
                          "sinkhorn_iters"},
    "train.loop_sampling": {"min_loops", "mean", "sigma", "cap"},
    "exit": {"threshold", "after"},
    "train.objective": set(),  # a node since the losses became a registry
}


# The source policy of `sources: null` when runs did not record it (before it was resolved into
# config.yaml): looped models read every earlier iteration, plain decoders every stride-th layer.
LEGACY_DEFAULT_POLICY = {True: "same_layer", False: "strided"}


def _record_legacy_policy(saved: DictConfig) -> None:
    """A run saved with `sources: null` used that time's default, whatever today's is."""
    da = OmegaConf.select(saved, "model.depth_attention")
    if not isinstance(da, DictConfig) or da.get("sources", None) is not None:
        return
    try:
        looped = int(saved.get("loop", 1)) > 1
    except (TypeError, ValueError):  # reported against the schema later
        return
    da["sources"] = LEGACY_DEFAULT_POLICY[looped]


def _migrate(saved: DictConfig) -> DictConfig:
    """A run saved by an older version, in today's keys: renamed keys take their new names, and
    the knobs of components the run did not choose (which it never used) are dropped."""
    from looped.components import schema, slots

    saved = saved.copy()
    for old, new in RENAMED.items():
        parent_path, _, leaf = old.rpartition(".")
        parent = OmegaConf.select(saved, parent_path)
        if isinstance(parent, DictConfig) and leaf in parent:
            value, current = parent.pop(leaf), OmegaConf.select(saved, new)
            if isinstance(value, DictConfig) and isinstance(current, DictConfig):
                # a renamed node whose new home already holds renamed keys: those win
                OmegaConf.update(saved, new, OmegaConf.merge(value, current), force_add=True)
            elif current is None:
                OmegaConf.update(saved, new, value, force_add=True)
    _record_legacy_policy(saved)
    loose = _loose([saved], [])
    for slot in slots().values():
        node = OmegaConf.select(saved, slot.path)
        if not isinstance(node, DictConfig):
            continue
        own = schema(slot, slot.component(loose)).__dataclass_fields__
        for key in [k for k in node if k in _FLAT_KNOBS[slot.path] and k not in own]:
            node.pop(key)
        for key in [k for k in node if node[k] is None and k in _FLAT_KNOBS[slot.path]]:
            node.pop(key)  # None meant "the component's default", now the knob's own default
        held_out = node.get("eval")
        if slot.path == "task" and isinstance(held_out, DictConfig):
            for key in [k for k in held_out if held_out[k] is None and k not in own]:
                held_out.pop(key)
    return saved


def parse_tool_args(cls: type, items: list[str], bare_lists: tuple[str, ...] = ()):
    """A command-line tool's `key=value` arguments into an instance of its dataclass `cls`;
    unknown keys and bad values raise a one-line ConfigError that lists the valid keys.
    bare_lists: list-valued keys that may also be given without brackets (ckpt=runs/a,
    tasks=a,b)."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not of the form key=value")
    items = [f"{key}=[{value}]" if key in bare_lists and not value.startswith("[") else item
             for item in items for key, _, value in [item.partition("=")]]
    base = OmegaConf.structured(cls)
    OmegaConf.set_struct(base, True)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(list(items)))
    except OmegaConfBaseException as e:
        known = ", ".join(cls.__dataclass_fields__)
        raise ConfigError(f"{first_line(e)} (arguments: {known})") from None
    return OmegaConf.to_object(cfg)


def _apply_dotlist(cfg: DictConfig, dotlist: list[str]) -> DictConfig:
    for item in dotlist:
        key = item.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(_unknown_key_message(cfg, key))
        try:
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad value in '{item}': {first_line(e)}") from None
    return cfg


_MISSING = object()


# ---------------------------------------------------------------------------------------------
# Validation: ranges and shapes, each failure one line.


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """The general ranges and shapes; each component node is checked by its own classes
    (looped.components.check)."""
    from looped.components import check, slots

    m = cfg.model
    _require(cfg.loop >= 1, f"loop must be >= 1, got {cfg.loop}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "ffn_dim", "max_seq_len"):
        _require(m[name] >= 1, f"model.{name} must be >= 1, got {m[name]}")
    for name in ("n_prelude", "n_coda"):
        _require(m[name] >= 0, f"model.{name} must be >= 0, got {m[name]}")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    _require(m.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {m.head_dim}")
    _require(0 < m.rope_theta < float("inf"),
             f"model.rope_theta must be > 0 and finite, got {m.rope_theta}")
    _require(m.attn_window >= 0, f"model.attn_window must be >= 0 (0: full causal), got "
             f"{m.attn_window}")
    _require(0 < m.norm_eps < float("inf"),
             f"model.norm_eps must be > 0 and finite, got {m.norm_eps}")
    _require(0 < m.init_std < float("inf"),
             f"model.init_std must be > 0 and finite, got {m.init_std}")
    _require(not (m.state_norm and m.cross_layer.method != "none"),
             f"model.state_norm normalises the residual stream between iterations; "
             f"cross_layer.method={m.cross_layer.method} carries its own streams: use one")
    KERNELS.lookup(m.kernel)
    ATTENTION_KINDS.lookup(m.attention).check_config(m)
    INJECTIONS.lookup(m.injection)
    INIT_STATES.lookup(m.init_state)
    _require(not (m.injection == "none" and m.init_state == "zeros"),
             "model.injection=none with model.init_state=zeros feeds the core only zeros; "
             "use model.init_state=embed")
    t = cfg.train
    _require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _require(0 < t.lr < float("inf"), f"train.lr must be > 0 and finite, got {t.lr}")
    _require(0 <= t.weight_decay < float("inf"),
             f"train.weight_decay must be >= 0 and finite, got {t.weight_decay}")
    _require(0 <= t.gate_beta < float("inf"),
             f"train.gate_beta must be >= 0 and finite, got {t.gate_beta}")
    _require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(t.warmup_fraction is None or 0 <= t.warmup_fraction < 1,
             f"train.warmup_fraction must be in [0, 1), got {t.warmup_fraction}")
    _require(0 <= t.grad_clip < float("inf"),
             f"train.grad_clip must be >= 0 and finite (0: none), got {t.grad_clip}")
    _require(0 <= cfg.threads <= 65536, f"threads must be in [0, 65536], got {cfg.threads}")
    _require(-2 ** 63 <= cfg.seed < 2 ** 63, f"seed must be in [-2**63, 2**63), got {cfg.seed}")
    _require(cfg.device in DEVICES,
             f"unknown device '{cfg.device}'; choose one of: {', '.join(DEVICES)}")
    _require(t.grad_loops >= 0, f"train.grad_loops must be >= 0, got {t.grad_loops}")
    _require(t.eval_every >= 1, f"train.eval_every must be >= 1, got {t.eval_every}")
    _require(t.keep_checkpoints >= 1,
             f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _require(t.activation_checkpointing in CHECKPOINTING_MODES,
             f"unknown train.activation_checkpointing '{t.activation_checkpointing}'; choose "
             f"one of: {', '.join(CHECKPOINTING_MODES)}")
    _require(t.activation_checkpointing == "none" or m.cross_layer.method == "none",
             f"train.activation_checkpointing needs the plain residual stream; "
             f"model.cross_layer.method={m.cross_layer.method} carries its own across layers")
    _require(t.activation_checkpointing != "iteration"
             or t.loop_sampling.sampler != "task",
             "train.activation_checkpointing=iteration checkpoints the fixed-R loop; per-row "
             "loop counts (train.loop_sampling.sampler=task) run the adaptive one: use block")
    _require(t.micro_batch_size >= 0,
             f"train.micro_batch_size must be >= 0 (0: the whole batch), got {t.micro_batch_size}")
    _require(t.micro_batch_size <= t.batch_size,
             f"train.micro_batch_size ({t.micro_batch_size}) must be <= train.batch_size "
             f"({t.batch_size})")
    _require(t.checkpoint_format in CHECKPOINT_FORMATS,
             f"unknown train.checkpoint_format '{t.checkpoint_format}'; choose one of: "
             f"{', '.join(CHECKPOINT_FORMATS)}")
    _require(not t.async_checkpoint or t.checkpoint_format == "sharded",
             "train.async_checkpoint=true needs train.checkpoint_format=sharded")
    _require(all(isinstance(r, int) and r >= 1 for r in cfg.eval.loops),
             f"eval.loops must be loop counts >= 1 (or [] to follow loop), got "
             f"{list(cfg.eval.loops)}")
    _require(cfg.eval.n_samples >= 1, f"eval.n_samples must be >= 1, got {cfg.eval.n_samples}")
    _require(cfg.eval.batch_size >= 0,
             f"eval.batch_size must be >= 0 (0: what fits in memory), got {cfg.eval.batch_size}")
    grid = cfg.eval.grid
    _require(grid.n_samples >= 1, f"eval.grid.n_samples must be >= 1, got {grid.n_samples}")
    _require(all(isinstance(v, int) and not isinstance(v, bool) for v in grid.levels),
             f"eval.grid.levels must be whole numbers (values of eval.grid.knob), got "
             f"{OmegaConf.to_container(grid.levels)}")
    for slot in slots().values():
        check(slot, OmegaConf.select(cfg, slot.path), cfg)
