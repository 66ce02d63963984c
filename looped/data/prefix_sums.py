"""Prefix sums of bits (Bansal et al. 2022, "End-to-end Algorithm Synthesis with Recurrent
Networks"): the input is a string of bits, the answer at every position the running sum mod 2
of the bits up to and including it. Its `last` variant asks only for the parity of the whole
string at its last bit (Fan et al. 2024, "Looped Transformers for Length Generalization").

Difficulty is the string's length. Train at one length (or a range, `min_length` ..
`length`) and score longer strings through `task.eval.length`. A row shorter than the batch's
longest is padded after its end (PAD, no targets), where a causal model cannot see it.

A BOS token opens every string (`bos`, default on): the first bit then has a left neighbour
like every other, as the zero padding of Deep Thinking's convolutions gives theirs. Without it a
model with local attention learned the first bit's boundary as a special case, and got strings
starting 1 1 wrong at every length.

Per-example loop counts: with `loops_per_bit` > 0 each row asks for
ceil(loops_per_bit * its length) iterations (Batch.loops), as Fan et al. grow the loop count
with the input; `train.loop_sampling.sampler=task` trains with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from looped.data.base import IGNORE, Batch, Task, knob_error, register_task

ANSWERS = ("all", "last")


def prefix_parity(bits: torch.Tensor) -> torch.Tensor:
    """(B, N) bits -> (B, N) running sums mod 2."""
    return bits.cumsum(dim=1) % 2


@register_task("prefix_sums")
class PrefixSumsTask(Task):
    """Tokens: 0 and 1 (bits), 2 PAD, 3 BOS. seq_len = length (+ 1 with bos), vocab_size = 4."""

    PAD, BOS = 2, 3

    @dataclass
    class Config:
        length: int = 16  # bits per string (the longest, when min_length is set)
        min_length: int = 0  # > 0: each row's length ~ U{min_length..length}; 0: all `length`
        answer: str = "all"  # all: the prefix sum at every bit | last: the parity at the end
        loops_per_bit: float = 0.0  # > 0: each row asks for ceil(this * length) iterations
        bos: bool = True  # a BOS token before the bits (no target at it)

        def check(self, cfg=None) -> None:
            if self.length < 1:
                raise knob_error("prefix_sums", f"length must be >= 1, got {self.length}")
            if not 0 <= self.min_length <= self.length:
                raise knob_error("prefix_sums", f"min_length must be in [0, length="
                                 f"{self.length}], got {self.min_length}")
            if self.answer not in ANSWERS:
                raise knob_error("prefix_sums", f"answer must be one of {', '.join(ANSWERS)}, "
                                 f"got '{self.answer}'")
            if not (self.loops_per_bit >= 0 and math.isfinite(self.loops_per_bit)):
                raise knob_error("prefix_sums", f"loops_per_bit must be >= 0, got "
                                 f"{self.loops_per_bit}")

    def __init__(self, length: int = Config.length, min_length: int = Config.min_length,
                 answer: str = Config.answer, loops_per_bit: float = Config.loops_per_bit,
                 bos: bool = Config.bos, **_):
        self.Config(length, min_length, answer, loops_per_bit, bos).check()
        self.length, self.min_length, self.answer = length, min_length, answer
        self.loops_per_bit, self.bos = loops_per_bit, bos
        self.vocab_size = 4
        self.seq_len = length + int(bos)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        b, n = batch_size, self.length
        bits = torch.randint(0, 2, (b, n), generator=generator)
        if self.min_length:
            lengths = torch.randint(self.min_length, n + 1, (b,), generator=generator)
        else:
            lengths = torch.full((b,), n)
        inside = torch.arange(n) < lengths[:, None]  # (B, N)
        sums = prefix_parity(bits)
        if self.answer == "all":
            targets = torch.where(inside, sums, IGNORE)
        else:
            last = (lengths - 1)[:, None]
            targets = torch.full_like(bits, IGNORE).scatter(1, last, sums.gather(1, last))
        inputs = torch.where(inside, bits, self.PAD)
        loops = (torch.ceil(self.loops_per_bit * lengths.double()).long().clamp_min(1)
                 if self.loops_per_bit > 0 else None)
        if self.bos:
            inputs = torch.cat([torch.full((b, 1), self.BOS), inputs], dim=1)
            targets = torch.cat([torch.full((b, 1), IGNORE), targets], dim=1)
        return Batch(inputs, targets, loops=loops)
