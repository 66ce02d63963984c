"""The language model: embed -> prelude -> core x R -> coda -> norm -> head.

With n_prelude = n_coda = 0 and loop = 1 it is a plain Qwen3-style decoder of n_layers layers.
Every layer application is one depth position (see looped.model.depth); Depth-Attention at a
position reads the same token's keys and mixed values at earlier positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from looped.errors import ConfigError, ShapeError
from looped.model.attention import ATTENTION_KINDS, Recorder
from looped.model import generation
from looped.model.block import Block
from looped.model.cache import ActivationStore, KVCache
from looped.model.cache_policy import cache_policy
from looped.model.compiled_decode import CompiledDecoder, decoder_for
from looped.model.cross_layer import CrossLayer, build_cross_layer, exit_conflict
from looped.model.depth import (DepthLayout, DepthWeights, resolve_policy, score_scales,
                                sources_for_layout)
from looped.model.adaptive import adaptive_loop
from looped.model.depth_pass import CoreResult, DepthPass, DepthPlan
from looped.model.exit import ExitCriterion, RowBudget
from looped.model.norm import RMSNorm
from looped.model.recurrence import INIT_STATES, INJECTIONS, first_input_is_embedding
from looped.model.rope import RotaryEmbedding


@dataclass
class LMOutput:
    logits: Optional[torch.Tensor]  # (B, T, vocab); None when called with logits=False
    layout: DepthLayout
    # depth position -> weights (B, T, Hkv, S + 1) and the source positions, if requested
    depth_weights: Optional[dict[int, DepthWeights]] = None
    # depth position -> sequence-attention weights (B, H, Tq, Tk), if requested (eager kernel)
    attn_weights: Optional[dict[int, torch.Tensor]] = None
    # loop iterations each token used (B, T): loops, or fewer under adaptive exit
    iterations: Optional[torch.Tensor] = None
    # with return_states: the state after each iteration run, each (B, T, d); fewer than R
    # when every token exited early (the remaining iterations are not run)
    states: Optional[list[torch.Tensor]] = None
    # with return_states and model.exit_gate: halting logits per iteration (R, B, T)
    gate_logits: Optional[torch.Tensor] = None
    # with logits=False: the coda's output before the head (B, T, d); head(hidden) = logits
    hidden: Optional[torch.Tensor] = None


class LoopedLM(nn.Module):
    def __init__(self, cfg, loop: int = 1):
        super().__init__()
        # plain dataclasses, not OmegaConf nodes: torch.compile traces through them
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_object(cfg)
        self.cfg, self.loop = cfg, loop
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_embedding else None
        self.attention_kind = ATTENTION_KINDS[cfg.attention]
        self.rope = RotaryEmbedding(self.attention_kind.rope_dim(cfg), cfg.max_seq_len,
                                    cfg.rope_theta)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        if cfg.share_weights:
            self.core = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        else:  # the unrolled baseline: one untied copy of the core per iteration
            self.core = nn.ModuleList(
                nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)) for _ in range(loop))
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.injection, self.init_state = INJECTIONS[cfg.injection](), INIT_STATES[cfg.init_state]()
        self.adapter = (nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
                        if self.injection.adapter else None)
        # a linear probe on the state giving a per-iteration halting logit (exit criterion 'gate')
        self.exit_gate = nn.Linear(cfg.d_model, 1) if cfg.exit_gate else None
        # model.state_norm: the state an iteration hands on is RMS-normalised, with a learned gain
        # that starts at the embedding's scale (init_std), so the injected input is not drowned
        self.state_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.state_norm else None
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                                 bias=False)
        # unrolled baselines (share_weights=false) get the looped default too, for a fair match
        self.policy = resolve_policy(cfg.depth_attention, looped=loop > 1)
        self._sources: dict[int, list[tuple[int, ...]]] = {}
        self._plans: dict[int, DepthPlan] = {}
        # how hidden states travel between depth positions (a plain residual stream by default)
        self.param_loops = cfg.cross_layer.param_loops or loop
        self.cross_layer: CrossLayer = build_cross_layer(
            cfg.cross_layer, cfg.d_model, self.layout(self.param_loops).n_positions,
            cfg.n_kv_heads * cfg.head_dim)
        self.cross_layer.injected_before = self.injection_slots()
        # activation checkpointing of training forwards: none | iteration | block (see
        # looped.model.parallelize.apply_activation_checkpointing)
        self.checkpointing = "none"
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        # residual-branch outputs shrink with the number of layer applications (GPT-2 style)
        out_std = std / (2 * self.layout().n_positions) ** 0.5
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.startswith("cross_layer."):  # methods init their own
                continue
            is_out = name.endswith(("o_proj.weight", "mlp.down.weight"))
            nn.init.normal_(p, 0.0, out_std if is_out else std)
        if self.state_norm is not None:
            nn.init.constant_(self.state_norm.weight, std)

    # -- depth positions -------------------------------------------------------------------

    def layout(self, loops: Optional[int] = None) -> DepthLayout:
        c = self.cfg
        return DepthLayout(c.n_prelude, c.n_layers, self.loop if loops is None else loops,
                           c.n_coda)

    def depth_sources(self, loops: int) -> list[tuple[int, ...]]:
        """Per depth position, the earlier positions its Depth-Attention reads."""
        if loops not in self._sources:
            self._sources[loops] = sources_for_layout(self.policy, self.layout(loops),
                                                      self.cfg.depth_attention)
        return self._sources[loops]

    def plan(self, loops: int) -> DepthPlan:
        """What runs at each depth position of a forward pass with `loops` iterations."""
        if loops not in self._plans:
            layout = self.layout(loops)
            sources = self.depth_sources(loops)
            scales = (score_scales(sources, self.depth_sources(self.loop))
                      if self.cfg.depth_attention.log_scale else ())
            self._plans[loops] = DepthPlan(
                layout, tuple(self.block_at(p, loops) for p in range(layout.n_positions)),
                tuple(sources), tuple(self.position_slots(loops)), scales)
        return self._plans[loops]

    def position_slots(self, loops: int) -> list[int]:
        """Per depth position of a run with `loops` iterations, the slot of the cross-layer
        method's parameters: the same index, except that the coda keeps the slots it has at
        param_loops iterations."""
        n = self.layout(loops).n_positions
        coda_start = n - self.cfg.n_coda
        shift = (self.param_loops - loops) * self.cfg.n_layers
        return [p if p < coda_start else p + shift for p in range(n)]

    def injection_slots(self) -> frozenset[int]:
        """Slots (at param_loops iterations) before which the loop's input injection changes the
        input: every iteration after the first unless injection=none, and the first unless its
        input is the prelude output itself."""
        c, first = self.cfg, self.cfg.n_prelude
        out = set()
        if not first_input_is_embedding(c.init_state, c.injection):
            out.add(first)
        if not self.injection.ignores_input:
            out.update(first + r * c.n_layers for r in range(1, self.param_loops))
        return frozenset(out)

    def supports_loops(self, loops: int) -> bool:
        if not self.cfg.share_weights:
            return loops == self.loop
        return loops >= 1 and (not self.cross_layer.per_position or loops <= self.param_loops)

    def runnable_loops(self, loops: list[int]) -> list[int]:
        """The loop counts of `loops` this model can be scored at: an unrolled model only at
        its own R (whatever the list), per-position cross-layer parameters up to param_loops."""
        if not self.cfg.share_weights:
            return [self.loop]
        return [r for r in loops if self.supports_loops(r)]

    def _check_loops(self, loops: Optional[int]) -> int:
        loops = self.loop if loops is None else loops
        if loops < 1:
            raise ShapeError(f"loops must be >= 1, got {loops}")
        if self.cross_layer.per_position and loops > self.param_loops:
            raise ShapeError(f"cross_layer.method={self.cfg.cross_layer.method} has parameters "
                             f"per depth position for up to {self.param_loops} iterations; cannot "
                             f"run loops={loops} (train with model.cross_layer.param_loops)")
        if not self.cfg.share_weights and loops != self.loop:
            raise ShapeError(f"an unrolled model (share_weights=false) has exactly {self.loop} "
                             f"copies of its core; cannot run loops={loops}")
        return loops

    def block_at(self, p: int, loops: Optional[int] = None) -> Block:
        """The block that runs at depth position p of a run with `loops` iterations."""
        slot = self.layout(loops).slot(p)
        if slot.stage == "prelude":
            return self.prelude[slot.layer]
        if slot.stage == "coda":
            return self.coda[slot.layer]
        return self.core_block(slot.iteration, slot.layer)

    def core_block(self, iteration: int, layer: int) -> Block:
        return self.core_blocks(iteration)[layer]

    def core_blocks(self, iteration: int) -> nn.ModuleList:
        """The core's layers at an iteration: shared, or that iteration's untied copy."""
        return self.core if self.cfg.share_weights else self.core[iteration]

    # -- forward -----------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: Optional[int] = None,
                  loops: Optional[int] = None, kv: str = "per_iteration") -> KVCache:
        """An empty cache for `loops` iterations (default: the config's loop). kv names the
        cache policy: `per_iteration` (exact) or `last` (one slot per layer, any R); see
        looped.model.cache_policy."""
        heads, k_dim, v_dim = self.attention_kind.cache_geometry(self.cfg)
        ref = self.embed.weight
        return KVCache(self.layout(self._check_loops(loops)), batch_size, heads,
                       max_len or self.cfg.max_seq_len, k_dim, v_dim=v_dim, policy=kv,
                       dtype=ref.dtype, device=ref.device)

    def cache_bytes_per_token(self, loops: Optional[int] = None,
                              kv: str = "per_iteration") -> int:
        """Bytes one token takes in a cache of policy kv for `loops` iterations (default: the
        config's loop), at the weights' dtype: what new_cache keeps per token and row."""
        heads, k_dim, v_dim = self.attention_kind.cache_geometry(self.cfg)
        slots = cache_policy(kv).n_slots(self.layout(self._check_loops(loops)))
        return slots * heads * (k_dim + v_dim) * self.embed.weight.element_size()

    def forward(self, input_ids: torch.Tensor, *, loops: Optional[int] = None,
                cache: Optional[KVCache] = None, exit: Optional[ExitCriterion] = None,
                grad_loops: Optional[int] = None, return_states: bool = False,
                return_depth_weights: bool = False, return_attn_weights: bool = False,
                row_loops: Optional[torch.Tensor] = None, logits: bool = True) -> LMOutput:
        """Logits for input_ids (B, T).

        loops: iterations of the core (default: the config's `loop`); any R for a shared core.
        cache: a KVCache to append to (prefill and decode); None runs the whole sequence.
        exit: an adaptive-exit criterion; exited tokens freeze (see looped.model.exit).
        grad_loops: truncated backprop, only the last k iterations carry gradient.
        row_loops: (B,) iterations per row (default loops: the largest); a row's tokens freeze
            after its count, as exited tokens do.
        logits: False skips the head and returns the hidden state instead, for losses and
            scores that run the head in chunks (looped.model.head_scores).
        """
        if row_loops is not None:
            loops = self._check_row_loops(row_loops, input_ids, loops)
            exit = RowBudget(row_loops, exit)
        b, t, start, loops = self._check_call(input_ids, loops, cache, exit, grad_loops)
        plan = self.plan(loops)
        if cache is not None:
            cache.begin(t, plan.layout, b)
        recorder = Recorder(return_depth_weights, return_attn_weights)
        # without exits, later positions read only Depth-Attention's sources
        store = cache if cache is not None else ActivationStore(
            None if exit is not None else frozenset(j for src in plan.sources for j in src))
        run = DepthPass(plan, store, self.rope, self.cfg.depth_attention.mix == "raw", recorder,
                        self.cross_layer, checkpoint_blocks=self._checkpoints("block"))

        x = self.embed(input_ids)  # (B, T, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(t, device=input_ids.device) + start)
        e = run.prelude(run.start(x))  # the prelude's output, injected every iteration
        if exit is None:
            core = self._loop(run, e, loops, grad_loops, return_states)
        else:  # tokens may stop early: looped.model.adaptive
            core = adaptive_loop(self, run, e, loops, exit, grad_loops, return_states)
        x = run.coda(core.state)
        if cache is not None:
            cache.commit()
        return LMOutput(self.head(x) if logits else None, plan.layout,
                        recorder.depth_weights if return_depth_weights else None,
                        recorder.attn_weights if return_attn_weights else None,
                        core.iterations, core.states if return_states else None,
                        core.gate_logits, None if logits else x)

    def _check_call(self, input_ids, loops, cache, exit, grad_loops):
        if input_ids.dim() != 2:
            raise ShapeError(f"input_ids must be (batch, tokens), got shape "
                             f"{tuple(input_ids.shape)}")
        b, t = input_ids.shape
        loops = self._check_loops(loops)
        if grad_loops is not None and grad_loops < 1:
            raise ShapeError(f"grad_loops must be >= 1 (None: every iteration), got {grad_loops}")
        start = cache.next_position() if cache is not None else 0
        # a tensor position comes from a compiled decoder, which checks its capacity itself
        if isinstance(start, int) and start + t > self.cfg.max_seq_len:
            raise ShapeError(f"sequence of {start + t} tokens exceeds model.max_seq_len="
                             f"{self.cfg.max_seq_len}")
        conflict = exit_conflict(self.cfg.cross_layer.method) if exit is not None else ""
        if conflict:
            raise ConfigError(conflict)
        return b, t, start, loops

    @staticmethod
    def _check_row_loops(row_loops: torch.Tensor, input_ids: torch.Tensor,
                         loops: Optional[int]) -> int:
        if row_loops.shape != input_ids.shape[:1]:
            raise ShapeError(f"row_loops must be (batch,) = {tuple(input_ids.shape[:1])}, got "
                             f"shape {tuple(row_loops.shape)}")
        low, top = int(row_loops.min()), int(row_loops.max())
        if low < 1:
            raise ShapeError(f"row_loops must be >= 1, got {low}")
        if loops is not None and loops < top:
            raise ShapeError(f"loops={loops} is fewer than the largest of row_loops ({top})")
        return top if loops is None else loops

    # -- the recurrence ----------------------------------------------------------------------

    def _loop(self, run: DepthPass, e: torch.Tensor, loops: int, grad_loops: Optional[int],
              return_states: bool) -> CoreResult:
        """The fixed-R recurrence: s_0 = init_state(e), s_{r+1} = core(inject(s_r, e)) for
        r < loops. Truncated backprop (grad_loops = k): the first loops - k iterations run
        without gradient. (With an exit criterion, looped.model.adaptive runs instead.)"""
        s = self.initial_state(e)
        out = CoreResult(s, torch.full(e.shape[:2], loops, dtype=torch.long, device=e.device))
        no_grad = 0 if grad_loops is None else max(0, loops - grad_loops)
        with torch.no_grad():
            for r in range(no_grad):
                s = self.iterate(run, r, s, e)
                self.record(out, s, return_states)
        step = self._checkpointed_iteration if self._checkpoints("iteration") else self.iterate
        for r in range(no_grad, loops):
            s = step(run, r, s, e)
            self.record(out, s, return_states)
        out.state = s
        return out

    def _checkpoints(self, mode: str) -> bool:
        return self.checkpointing == mode and torch.is_grad_enabled()

    def _checkpointed_iteration(self, run: DepthPass, r: int, s: torch.Tensor,
                                e: torch.Tensor) -> torch.Tensor:
        """One iteration whose activations backward recomputes: it keeps only its inputs
        (the state s_r, and the injected e shared by all iterations)."""
        first = run.p

        def iteration(s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            run.p = first  # the recompute walks this iteration's depth positions again
            return self.iterate(run, r, s, e)

        return checkpoint(iteration, s, e, use_reentrant=False)

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """s_0 from the prelude's output e (model.init_state)."""
        return self.init_state(e, self.cfg.init_std)

    def iterate(self, run: DepthPass, r: int, s: torch.Tensor, e: torch.Tensor,
                frozen: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One iteration, s_r -> s_{r+1} (B, T, d); on `rows` of the batch only, if given (the
        result then holds those rows). frozen: tokens that exited (see DepthPass.iteration)."""
        if r == 0 and first_input_is_embedding(self.cfg.init_state, self.cfg.injection):
            x = e  # the same tensor tells cross-layer methods nothing changed
        else:
            x = self.injection(s, e, self.adapter)
        x = run.inject(x)
        if rows is not None:
            x = x[rows]
        x = run.iteration(x, frozen=frozen, rows=rows)
        return x if self.state_norm is None else self.state_norm(x)

    def record(self, out: CoreResult, s: torch.Tensor, return_states: bool) -> None:
        """Keep the state after an iteration (and the gate's halting logit) if asked."""
        if return_states:
            out.states.append(s)
            if self.exit_gate is not None:
                # the gate reads the state, but its loss must not train the core
                out.gates.append(self.gate_logit(s.detach()))

    def gate_logit(self, state: torch.Tensor) -> torch.Tensor:
        """Halting logit of the exit gate for a state (B, T, d) -> (B, T)."""
        normed = F.rms_norm(state, (state.shape[-1],), eps=self.cfg.norm_eps)
        return self.exit_gate(normed).squeeze(-1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    # -- generation (looped.model.generation) ------------------------------------------------

    def cached_forward(self, input_ids: torch.Tensor, **kw) -> LMOutput:
        """Teacher-forced logits as a cached decode computes them; see
        looped.model.generation.cached_forward."""
        return generation.cached_forward(self, input_ids, **kw)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kw):
        """Append max_new_tokens sampled tokens to input_ids (B, T); see
        looped.model.generation.generate for the options (temperature, top_k, loops, exit,
        kv, compile, ...)."""
        return generation.generate(self, input_ids, max_new_tokens, **kw)

    def compiled_decoder(self, batch_size: int, max_len: int, loops: Optional[int] = None,
                         kv: str = "per_iteration") -> CompiledDecoder:
        """A CompiledDecoder for these shapes, kept for reuse; see
        looped.model.compiled_decode.decoder_for."""
        return decoder_for(self, batch_size, max_len, self._check_loops(loops), kv)
