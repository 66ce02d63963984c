"""How the recurrence is fed: the state before the first iteration (`model.init_state`) and how
the prelude's output e re-enters it before every iteration (`model.injection`, recall).

    s_0     = init_state(e)
    x_r     = inject(s_r, e)        the core's input at iteration r
    s_{r+1} = core(x_r)

Each is chosen by name from a registry; a plugin adds one with `INJECTIONS.register(name)` on
an `Injection` subclass (or `INIT_STATES.register` on an `InitState` one).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from looped.registry import Registry

INJECTIONS = Registry("model.injection")  # model.injection -> Injection subclass
INIT_STATES = Registry("model.init_state")  # model.init_state -> InitState subclass


class Injection:
    """inject(state, e) -> the core's input. `adapter` injections own a (2d -> d) linear map,
    which the model keeps as `LoopedLM.adapter` (so checkpoints name it the same for all)."""

    adapter: bool = False
    # whether inject(s, e) == s whatever e is: no input re-enters the loop
    ignores_input: bool = False

    def __call__(self, state: torch.Tensor, e: torch.Tensor,
                 adapter: Optional[nn.Module]) -> torch.Tensor:
        raise NotImplementedError


@INJECTIONS.register("add")
class AddInjection(Injection):
    """Recall: the input is added to the state every iteration."""

    def __call__(self, state, e, adapter):
        return state + e


@INJECTIONS.register("concat")
class ConcatInjection(Injection):
    """Huginn's adapter: a linear map of [state, e]."""

    adapter = True

    def __call__(self, state, e, adapter):
        return adapter(torch.cat([state, e], dim=-1))


@INJECTIONS.register("none")
class NoInjection(Injection):
    """No recall: the input only starts the state (use init_state=embed)."""

    ignores_input = True

    def __call__(self, state, e, adapter):
        return state


class InitState:
    """s_0 from the prelude's output e (B, T, d)."""

    def __call__(self, e: torch.Tensor, std: float) -> torch.Tensor:
        raise NotImplementedError


@INIT_STATES.register("zeros")
class ZeroState(InitState):
    def __call__(self, e, std):
        return torch.zeros_like(e)


@INIT_STATES.register("embed")
class EmbedState(InitState):
    def __call__(self, e, std):
        return e


@INIT_STATES.register("noise")
class NoiseState(InitState):
    """Huginn's random initial state, at the scale of the weight init."""

    def __call__(self, e, std):
        return torch.randn_like(e) * std


def first_input_is_embedding(init_state: str, injection: str) -> bool:
    """Whether the first iteration's input is exactly e (zeros + e, or e not re-injected): the
    model then skips the injection there, and cross-layer methods see no change of input."""
    return (init_state, injection) in {("zeros", "add"), ("embed", "none")}
