"""Export a trained run to a `transformers` model directory.

The directory holds config.json (with an `auto_map`), model.safetensors, the modeling code
(modeling_looped.py, configuration_looped.py: torch and transformers only) and a tokenizer:
byte-level text gets LoopedByteTokenizer, BPE text its `tokenizers` file (tokenizer.json), a
built-in task its token table (tokens.json, read by LoopedTableTokenizer). Load it with

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    AutoTokenizer.from_pretrained(out, trust_remote_code=True)

Before it returns, the export loads the directory back and checks that its logits equal the
run's own on a random batch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import torch

from looped.errors import ConfigError

EXPORTABLE_POLICIES = ("none", "dense", "strided", "same_layer", "anchor", "window", "anchor_window",
                       "loop_strided")
PARITY_TOLERANCE = 1e-5  # max |logit difference| the export accepts (float32)


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("export needs transformers: pip install -e '.[hf]'") from None
    return transformers


def check_out_dir(out) -> Path:
    """The output directory: new, empty, or an earlier export (which is overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a directory")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ConfigError(f"out={out} exists and is not an exported model; choose an empty or "
                          f"new directory")
    return out


def check_exportable(cfg, model) -> None:
    """One-line errors for what the exported code does not implement."""
    m = cfg.model
    if m.attention != "gqa":
        raise ConfigError(f"cannot export model.attention={m.attention}: the exported model "
                          f"implements GQA attention only")
    if m.cross_layer.method != "none":
        raise ConfigError(f"cannot export cross_layer.method={m.cross_layer.method}: the "
                          f"exported model implements the plain residual stream only")
    if m.attn_window:
        raise ConfigError("cannot export model.attn_window > 0: the exported model implements "
                          "full causal attention only")
    if m.depth_attention.mix != "mixed":
        raise ConfigError("cannot export depth_attention.mix=raw (an ablation); only mixed")
    if m.depth_attention.log_scale:
        raise ConfigError("cannot export depth_attention.log_scale=true: the exported model "
                          "implements unscaled depth scores only")
    if model.policy not in EXPORTABLE_POLICIES:
        raise ConfigError(f"cannot export the depth source policy '{model.policy}'; the exported "
                          f"model implements {', '.join(EXPORTABLE_POLICIES)}")


def hf_config(cfg, model):
    """The LoopedConfig of a run: its model fields, the source policy and the trained loop."""
    from looped.integrations.hf.configuration_looped import LoopedConfig

    m, da = cfg.model, cfg.model.depth_attention
    fields = ("vocab_size", "d_model", "n_layers", "n_prelude", "n_coda", "n_heads", "n_kv_heads",
              "head_dim", "ffn_dim", "rope_theta", "pos_embedding", "max_seq_len", "norm_eps",
              "tie_embeddings", "share_weights", "injection", "init_state", "init_std",
              "exit_gate", "state_norm")
    return LoopedConfig(**{f: getattr(m, f) for f in fields}, depth_sources=model.policy,
                        depth_stride=getattr(da, "stride", None),
                        depth_window=getattr(da, "window", 0), loops=cfg.loop)


def save_tokenizer(task, out: Path, vocab_size: int) -> str:
    """Write the task's tokenizer into out; returns what kind it is. vocab_size: the model's,
    which may exceed the task's (every id the model can emit gets a name)."""
    from looped.integrations.hf.tokenization_looped import LoopedByteTokenizer, LoopedTableTokenizer

    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None:  # a built-in task: its ids, named by their numbers
        names = [str(i) for i in range(max(task.vocab_size, vocab_size))]
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokens.json").write_text(json.dumps(names))
            tok = LoopedTableTokenizer(str(Path(tmp) / "tokens.json"))
            tok.register_for_auto_class("AutoTokenizer")
            tok.save_pretrained(out)
        return "token table"
    if hasattr(tokenizer, "tok"):  # BPE: the `tokenizers` object itself
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok).save_pretrained(out)
        return "BPE (tokenizer.json)"
    tok = LoopedByteTokenizer()
    tok.register_for_auto_class("AutoTokenizer")
    tok.save_pretrained(out)
    return "bytes"


def export_model(cfg, model, task, out: Path, check: bool = True) -> dict:
    """Write the HF directory for (cfg, model) and its task's tokenizer; returns a summary."""
    require_transformers()
    from looped.integrations.hf.modeling_looped import LoopedForCausalLM

    check_exportable(cfg, model)
    config = hf_config(cfg, model)
    config.register_for_auto_class()
    hf = LoopedForCausalLM(config)
    hf.load_state_dict(model.state_dict(), strict=True)
    hf.register_for_auto_class("AutoModelForCausalLM")
    # no pad_token_id in the generation config: id 0 is a real token of every vocabulary here,
    # and transformers would read a prompt's 0s as padding; batches pass attention_mask instead
    out = check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    # save_pretrained also writes the registered classes' code: modeling_looped.py and the
    # configuration_looped.py it imports relatively
    tokenizer = save_tokenizer(task, out, cfg.model.vocab_size)
    error = parity_error(model, out, cfg.loop) if check else None
    if error is not None and error > PARITY_TOLERANCE:
        raise ConfigError(f"the exported model's logits differ from the run's by {error:.2e} "
                          f"(> {PARITY_TOLERANCE:g}); the export in {out} is not faithful")
    return {"out": str(out), "tokenizer": tokenizer, "loops": cfg.loop,
            "parameters": sum(p.numel() for p in hf.parameters()), "max_abs_logit_error": error}


@torch.no_grad()
def parity_error(model, out: Path, loops: int, seed: int = 0,
                 batch: int = 2, tokens: Optional[int] = None) -> float:
    """Max |logit difference| between the run's model and the directory loaded back with
    `transformers`, on a random batch."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    g = torch.Generator().manual_seed(seed)
    t = tokens or min(32, model.cfg.max_seq_len)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, t), generator=g)
    return float((hf(ids).logits - model(ids, loops=loops).logits).abs().max())
