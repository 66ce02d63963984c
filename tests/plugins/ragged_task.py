"""A plugin task for the tests (imported with `imports=[tests/plugins/ragged_task.py]`):
"ragged", where each row scores a different number of positions, so ranks of a data-parallel
run hold different numbers of answer tokens and the loss weighting between them matters."""

import torch

from looped.data import IGNORE, Batch, Task, register_task


@register_task("ragged")
class RaggedTask(Task):
    """Tokens 1..15 after a first token; every scored position predicts the first token. Row i
    scores a random number (1 .. length - 1) of its positions."""

    def __init__(self, **_):
        self.vocab_size, self.seq_len = 16, 24

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        x = torch.randint(1, self.vocab_size, (batch_size, self.seq_len), generator=generator)
        scored = torch.rand(batch_size, self.seq_len, generator=generator)
        keep = torch.randint(1, self.seq_len, (batch_size, 1), generator=generator)
        rank = scored.argsort(dim=1).argsort(dim=1)  # each row's positions in a random order
        targets = torch.where(rank < keep, x[:, :1].expand_as(x), IGNORE)
        targets[:, 0] = IGNORE
        return Batch(x, targets)
