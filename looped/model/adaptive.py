"""The adaptive-compute path of the loop: the fixed-R recurrence (LoopedLM._loop) plus the rules
for tokens that stop early. Decoding, evaluation under an exit criterion and per-row loop
counts (RowBudget) run it; plain training and fixed-R evaluation never enter it.

    for r in 0..R-1:
        s_{r+1} = core(inject(s_r, e)), except that a token that exited keeps s_r, and at each
                  depth position keeps its key and mixed value of one iteration back (frozen)
        stop    = exit.check(iteration r)         tokens that exit now
        a row whose tokens all exited leaves the batch (decoding a KVCache of at least
                  exit.drop_rows_from rows); its later positions copy its last entries
        every token exited: the remaining positions copy their last entries; stop
"""

from __future__ import annotations

from typing import Optional

import torch

from looped.model.depth_pass import CoreResult, DepthPass
from looped.model.exit import ExitCriterion, IterationView


def adaptive_loop(model, run: DepthPass, e: torch.Tensor, loops: int, exit: ExitCriterion,
                  grad_loops: Optional[int], return_states: bool) -> CoreResult:
    """model: the LoopedLM whose iteration (`iterate`) and read-outs (`head`, the gate) it
    runs; the rest as LoopedLM._loop."""
    b, t, _ = e.shape
    s = model.initial_state(e)
    done: Optional[torch.Tensor] = None  # (B, T) tokens that exited
    active: Optional[torch.Tensor] = None  # rows still computed (1-D index); None: all
    dropped: list[tuple[int, torch.Tensor]] = []  # (last iteration computed, rows)
    out = CoreResult(s, torch.full((b, t), loops, dtype=torch.long, device=e.device))
    first_with_grad = 0 if grad_loops is None else max(0, loops - grad_loops)
    gate = model.gate_logit if model.exit_gate is not None else None
    exit.init()
    for r in range(loops):
        with torch.set_grad_enabled(torch.is_grad_enabled() and r >= first_with_grad):
            if active is None:
                x = model.iterate(run, r, s, e, frozen=done)
                if done is not None:  # exited tokens keep their state
                    x = torch.where(done.unsqueeze(-1), s, x)
            else:
                # with one token per row, a running row's token has not exited: nothing in it
                # is frozen
                keep = done[active] if t > 1 else None
                x = model.iterate(run, r, s, e, frozen=keep, rows=active)
                if keep is not None:
                    x = torch.where(keep.unsqueeze(-1), s[active], x)
                x = s.index_copy(0, active, x)
        prev, s = s, x
        model.record(out, s, return_states)
        stop = exit.check(IterationView(r, s, prev, model.head, gate))
        stop = stop if done is None else stop & ~done
        out.iterations = torch.where(stop, r + 1, out.iterations)
        done = stop if done is None else done | stop
        if r + 1 == loops:
            break
        if bool(done.all()):
            for last, rows in dropped:  # rows that stopped earlier, then everyone else
                run.carry_forward(last, loops, rows)
            run.skip_core_iterations(r, loops)  # every token exited: copy, don't compute
            dropped = []
            break
        if run.can_drop_rows and 0 < exit.drop_rows_from <= b:
            active, newly = drop_finished_rows(done, active)
            if newly is not None:
                dropped.append((r, newly))
    for last, rows in dropped:
        run.carry_forward(last, loops, rows)
    out.state = s
    return out


def drop_finished_rows(done: torch.Tensor, active: Optional[torch.Tensor]):
    """(the rows still running, the rows that just finished or None): a row finishes when all
    its tokens have exited."""
    running = ~done.all(1)
    if active is not None:
        was = torch.zeros_like(running)
        was[active] = True
        finished_now = was & ~running
    else:
        finished_now = ~running
    if not bool(finished_now.any()):
        return active, None
    return running.nonzero().flatten(), finished_now.nonzero().flatten()
