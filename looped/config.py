"""Typed configuration: OmegaConf structured dataclasses, YAML presets, CLI dotlist overrides.

`load_config(["loop=8", "model=small", "model.d_model=256"])` resolves exactly as `train.py` does:
  1. the dataclass defaults below,
  2. configs/defaults.yaml,
  3. preset selections `group=name` (configs/<group>/<name>.yaml), in the order given,
  4. dotlist overrides `a.b=value`, in the order given,
then validates ranges and shapes. Every problem raises `ConfigError` with a one-line message.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from looped.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DepthAttentionConfig:
    enabled: bool = True  # false: the vanilla model
    # Name in looped.model.depth.SOURCE_POLICIES. None picks `strided` for a plain decoder and
    # `same_layer` for a looped one.
    sources: Optional[str] = None
    stride: Optional[int] = None  # `strided`: None means n_layers // 2 (the authors' setting)
    window: int = 0  # `strided`: also attend to the w most recent depth positions
    mix: str = "mixed"  # mixed: sources contribute their mixed values; raw: their raw values


@dataclass
class CrossLayerConfig:
    """A cross-layer baseline (looped.model.cross_layer); `none` is the plain residual stream."""

    method: str = "none"  # none | denseformer | value_residual | attn_res | mhc | hyper_connections
    # methods with parameters per depth position hold them for this many iterations; 0: loop
    max_loops: int = 0
    dilation: int = 1  # denseformer: average every dilation-th earlier output
    period: int = 1  # denseformer: an average after every period-th block
    learnable: bool = False  # value_residual: learnable lambdas (init 0.5 / 0.5), else fixed
    block_size: int = 0  # attn_res: 0 = full; k > 0 = block variant, blocks of k positions
    streams: int = 4  # mhc, hyper_connections: residual streams
    sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations


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
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = True  # the head reuses the token embedding
    kernel: str = "sdpa"  # sdpa | eager | xformers
    share_weights: bool = True  # false: the core becomes `loop` untied copies (unrolled baseline)
    injection: str = "add"  # how the prelude output e enters each iteration: add | concat | none
    init_state: str = "zeros"  # the state before the first iteration: zeros | embed | noise
    init_std: float = 0.02  # std of the weight init (residual outputs scaled down by depth)
    exit_gate: bool = False  # a learned halting probe on the state (exit criterion 'gate')
    depth_attention: DepthAttentionConfig = field(default_factory=DepthAttentionConfig)
    cross_layer: CrossLayerConfig = field(default_factory=CrossLayerConfig)


@dataclass
class LoopSamplingConfig:
    """How many iterations each training step runs (looped.loop_sampling)."""

    sampler: str = "fixed"  # fixed (= loop) | uniform | poisson_lognormal
    min_loops: int = 1  # uniform draws from [min_loops, loop]; both samplers clip below here
    mean: float = 0.0  # poisson_lognormal: E[R] - 1; 0 means loop - 1
    sigma: float = 0.5  # poisson_lognormal: log-normal spread
    max_loops: int = 0  # poisson_lognormal: upper clip; 0 means 2 * loop


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 64  # sequences per step (global under torchrun)
    lr: float = 2e-3  # peak learning rate (AdamW, betas 0.9 / 0.95)
    weight_decay: float = 0.1  # on weight matrices only (looped.optim)
    warmup_steps: int = 20  # linear warmup, then a cosine to 10% of lr
    warmup_fraction: Optional[float] = None  # warmup as a fraction of steps; set, it wins
    grad_clip: float = 1.0  # global gradient-norm clip; 0: none
    log_every: int = 10  # print a training line every N steps
    loops: LoopSamplingConfig = field(default_factory=LoopSamplingConfig)
    grad_loops: int = 0  # truncated backprop: only the last k iterations carry gradient; 0: all
    # final: loss on the last iteration's logits; per_iteration: a loss after every iteration
    # (against the task's intermediate targets where it has them, else the final answer)
    loss: str = "final"
    gate_beta: float = 0.01  # entropy bonus of the exit-gate loss (model.exit_gate=true)
    compile: bool = False  # torch.compile the training forward (first steps pay the compile)
    # a NaN/Inf loss or gradient stops the run (exit code 3); true skips the step and counts it
    skip_nonfinite: bool = False
    eval_every: int = 100  # held-out evaluation (and a checkpoint) every N steps
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    # data parallelism under torchrun (world size > 1): ddp | fsdp (FSDP2); batch_size is global
    parallel: str = "ddp"


@dataclass
class ExitConfig:
    """Adaptive exit at inference (looped.model.exit)."""

    criterion: str = "none"  # none | kl | entropy | latent | gate | max_loops
    threshold: Optional[float] = None  # None: the criterion's own default
    max_loops: int = 1  # for criterion max_loops


@dataclass
class TaskDifficulty:
    """Difficulty knobs of the held-out split; None keeps the training value, so evaluation can
    go beyond the trained difficulty (e.g. task.eval.hops=8 after training with task.hops=4)."""

    chain_len: Optional[int] = None  # roots, held out (null: as trained)
    hops: Optional[int] = None  # chain and phop, held out
    digits: Optional[int] = None  # addition, held out
    length: Optional[int] = None  # phop, held out


@dataclass
class TaskConfig:
    name: str = "roots"  # a registered task: roots, chain, phop, addition, text, or a plugin's
    # roots: root finding in a forest of parent pointers
    n_chains: int = 4  # trees in the forest
    chain_len: int = 6  # nodes per chain (the deepest query is chain_len - 1 hops)
    n_queries: int = 8  # questions per sequence
    # chain: variable chasing (a = b; b = c; ...) with distractor chains
    hops: int = 4
    n_distractors: int = 2  # chain: chains besides the queried one
    # phop: p-hop induction (Saunshi et al. 2025); `hops` is p
    length: int = 64  # sequence length (long enough that p hops rarely run out of room)
    alphabet: int = 4  # phop: tokens in the sequence's alphabet
    # addition: multi-digit, digits reversed
    digits: int = 5
    # text: language modelling through `datasets` (looped.data.text)
    corpus: str = "shakespeare"  # shakespeare (built in) | a local file or dir | a hub dataset
    text_field: str = "text"  # text: the column that holds the text
    seq_len: int = 256  # text: window length in tokens
    tokenizer: str = "byte"  # byte | bpe
    bpe_vocab: int = 1024  # text: BPE vocabulary size
    held_out: float = 0.05  # fraction of documents held out
    eval: TaskDifficulty = field(default_factory=TaskDifficulty)


@dataclass
class EvalConfig:
    # loop counts to score during training; empty: follow `loop` (see default_eval_loops)
    loops: list[int] = field(default_factory=list)
    n_samples: int = 1024  # held-out sequences per loop count
    batch_size: int = 256  # held-out sequences per forward


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


def default_eval_loops(loop: int) -> list[int]:
    """What training scores when eval.loops is empty: a plain decoder (loop=1) at R = 1 only; a
    looped model at 1..loop (above 8: 1, 2, 3, 4, 6, 8, 12, ... and loop) and past it, at 1.5
    and 2 times loop."""
    if loop == 1:
        return [1]
    ladder = {k * 2 ** e for k in (2, 3) for e in range(loop.bit_length())}
    inside = range(1, loop + 1) if loop <= 8 else {1, loop} | {r for r in ladder if r <= loop}
    return sorted(set(inside) | {loop + loop // 2, 2 * loop})


def eval_loops(cfg) -> list[int]:
    """The loop counts training evaluates: eval.loops, or default_eval_loops(loop)."""
    return list(cfg.eval.loops) or default_eval_loops(cfg.loop)


# ---------------------------------------------------------------------------------------------
# Loading


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


NOT_PRESETS = ("study",)  # configs/study/ holds study files (looped.study), not config presets


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


def _unknown_key_message(cfg: DictConfig, key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key '{key}'{hint}"


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
        raise ConfigError(f"{source}: {first_line(e)}") from None


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
            names = list(value) if OmegaConf.is_list(value) else [str(value)]
    return names


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Resolve the config exactly as `python train.py <overrides>` does, then validate it."""
    from looped.plugins import import_plugins

    import_plugins(_plugins_of(overrides))
    cfg = OmegaConf.structured(Config)
    defaults = CONFIG_DIR / "defaults.yaml"
    if defaults.is_file():
        cfg = _merge(cfg, load_yaml(defaults), str(defaults))
    groups = set(preset_groups())
    dotlist = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key in groups:
            if value not in presets(key):
                raise ConfigError(
                    f"unknown {key} preset '{value}'; choose one of: {', '.join(presets(key))}"
                )
            preset = load_yaml(CONFIG_DIR / key / f"{value}.yaml")
            cfg = _merge(cfg, OmegaConf.create({key: preset}), f"preset {key}={value}")
        else:
            dotlist.append(item)
    cfg = _apply_dotlist(cfg, dotlist)
    # plugin files by absolute path, so a saved run finds them from any directory
    cfg.imports = [str(Path(n).expanduser().resolve()) if str(n).endswith(".py") else n
                   for n in cfg.imports]
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def load_config_file(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """A saved, resolved config (a run's config.yaml) with dotlist overrides, validated."""
    from looped.plugins import import_plugins

    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    saved = load_yaml(Path(path))
    import_plugins([*saved.get("imports", []), *_plugins_of(overrides)])
    cfg = _merge(OmegaConf.structured(Config), saved, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    cfg = _apply_dotlist(cfg, list(overrides))
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def parse_tool_args(cls: type, items: list[str]):
    """A command-line tool's `key=value` arguments into an instance of its dataclass `cls`;
    unknown keys and bad values raise a one-line ConfigError that lists the valid keys."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"argument '{item}' is not of the form key=value")
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
    from looped.loop_sampling import LOOP_SAMPLERS, max_sampled_loops
    from looped.model.cross_layer import CROSS_LAYER_METHODS
    from looped.model.depth import SOURCE_POLICIES
    from looped.model.exit import EXIT_CRITERIA
    from looped.model.kernels import KERNELS

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
    _require(m.rope_theta > 0, f"model.rope_theta must be > 0, got {m.rope_theta}")
    _require(m.kernel in KERNELS,
             f"unknown attention kernel '{m.kernel}'; choose one of: {', '.join(KERNELS)}")
    _require(m.injection in ("add", "concat", "none"),
             f"unknown model.injection '{m.injection}'; choose one of: add, concat, none")
    _require(m.init_state in ("zeros", "embed", "noise"),
             f"unknown model.init_state '{m.init_state}'; choose one of: zeros, embed, noise")
    _require(not (m.injection == "none" and m.init_state == "zeros"),
             "model.injection=none with model.init_state=zeros feeds the core only zeros; "
             "use model.init_state=embed")
    d = m.depth_attention
    if d.sources is not None:
        _require(d.sources in SOURCE_POLICIES,
                 f"unknown depth source policy '{d.sources}'; choose one of: "
                 f"{', '.join(SOURCE_POLICIES)}")
    _require(d.stride is None or d.stride >= 1, f"model.depth_attention.stride must be >= 1")
    _require(d.window >= 0, f"model.depth_attention.window must be >= 0, got {d.window}")
    _require(d.mix in ("mixed", "raw"),
             f"unknown model.depth_attention.mix '{d.mix}'; choose one of: mixed, raw")
    c = m.cross_layer
    _require(c.method in CROSS_LAYER_METHODS,
             f"unknown cross-layer method '{c.method}'; choose one of: "
             f"{', '.join(CROSS_LAYER_METHODS)}")
    _require(c.max_loops == 0 or c.max_loops >= cfg.loop,
             f"model.cross_layer.max_loops must be 0 (= loop) or >= loop={cfg.loop}, "
             f"got {c.max_loops}")
    _require(m.share_weights or c.max_loops in (0, cfg.loop),
             f"an unrolled model (share_weights=false) runs exactly loop={cfg.loop} iterations; "
             f"model.cross_layer.max_loops must be 0 or {cfg.loop}")
    for name in ("dilation", "period", "sinkhorn_iters"):
        _require(c[name] >= 1, f"model.cross_layer.{name} must be >= 1, got {c[name]}")
    _require(c.block_size >= 0, f"model.cross_layer.block_size must be >= 0, got {c.block_size}")
    # mhc's initial read weights give every other stream 0.01 and must leave a positive rest
    _require(2 <= c.streams <= 64, f"model.cross_layer.streams must be in [2, 64], got {c.streams}")
    _require(c.method == "none" or cfg.exit.criterion == "none",
             f"adaptive exit freezes the plain residual state; cross_layer.method={c.method} "
             f"keeps other state, so use exit.criterion=none")
    t = cfg.train
    if CROSS_LAYER_METHODS[c.method].has_position_params(c):
        top = max_sampled_loops(t.loops, cfg.loop)
        _require(top <= (c.max_loops or cfg.loop),
                 f"train.loops.sampler={t.loops.sampler} draws up to {top} iterations, but "
                 f"cross_layer.method={c.method} has parameters for "
                 f"{c.max_loops or cfg.loop}; set model.cross_layer.max_loops={top}")
    _require(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    _require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(t.warmup_fraction is None or 0 <= t.warmup_fraction < 1,
             f"train.warmup_fraction must be in [0, 1), got {t.warmup_fraction}")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    _require(cfg.threads >= 0, f"threads must be >= 0, got {cfg.threads}")
    _require(cfg.device in ("auto", "cpu", "cuda"),
             f"unknown device '{cfg.device}'; choose one of: auto, cpu, cuda")
    _require(t.loss in ("final", "per_iteration"),
             f"unknown train.loss '{t.loss}'; choose one of: final, per_iteration")
    _require(t.grad_loops >= 0, f"train.grad_loops must be >= 0, got {t.grad_loops}")
    ls = t.loops
    _require(ls.sampler in LOOP_SAMPLERS,
             f"unknown train.loops.sampler '{ls.sampler}'; choose one of: "
             f"{', '.join(LOOP_SAMPLERS)}")
    _require(1 <= ls.min_loops <= cfg.loop,
             f"train.loops.min_loops must be in [1, loop={cfg.loop}], got {ls.min_loops}")
    _require(ls.sigma >= 0 and ls.mean >= 0, "train.loops.mean and sigma must be >= 0")
    _require(ls.sampler == "fixed" or m.share_weights,
             "an unrolled model (model.share_weights=false) runs exactly `loop` iterations; "
             "use train.loops.sampler=fixed")
    _require(t.eval_every >= 1, f"train.eval_every must be >= 1, got {t.eval_every}")
    _require(t.keep_checkpoints >= 1,
             f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _require(all(r >= 1 for r in cfg.eval.loops),
             f"eval.loops must be loop counts >= 1 (or [] to follow loop), got "
             f"{list(cfg.eval.loops)}")
    _require(cfg.eval.n_samples >= 1 and cfg.eval.batch_size >= 1,
             "eval.n_samples and eval.batch_size must be >= 1")
    e = cfg.exit
    _require(e.criterion == "none" or e.criterion in EXIT_CRITERIA,
             f"unknown exit criterion '{e.criterion}'; choose one of: none, "
             f"{', '.join(EXIT_CRITERIA)}")
    _require(e.criterion != "gate" or m.exit_gate,
             "exit.criterion=gate needs a model trained with model.exit_gate=true")
    _require(e.max_loops >= 1, f"exit.max_loops must be >= 1, got {e.max_loops}")
