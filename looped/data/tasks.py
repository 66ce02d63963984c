"""Built-in reasoning tasks, generated on the fly and scored by exact match on answer tokens:
roots, chain, phop, addition. The shared interface lives in looped.data.base; its names are
importable from here too, for task authors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from looped.data.base import IGNORE, TASKS, Batch, Task, knob_error, register_task

__all__ = ["IGNORE", "TASKS", "Batch", "Task", "register_task", "RootsTask", "ChainTask",
           "PHopTask", "AdditionTask"]

@register_task("roots")
class RootsTask(Task):
    """Root finding in a forest of parent pointers.

    Nodes 0..N-1 form n_chains chains of chain_len nodes under a random labelling; each node's
    parent is the previous node of its chain and each root points to itself. The input is
    `P[0] .. P[N-1] SEP q_1 .. q_n` and the target at query q_i's position is root(q_i).
    Following one pointer per step, a query at depth d needs d steps.
    """

    @dataclass
    class Config:
        n_chains: int = 4  # trees in the forest
        chain_len: int = 6  # nodes per chain (the deepest query is chain_len - 1 hops)
        n_queries: int = 8  # questions per sequence

        def check(self, cfg=None) -> None:
            for name, low in (("n_chains", 1), ("chain_len", 2), ("n_queries", 1)):
                if getattr(self, name) < low:
                    raise knob_error("roots", f"{name} must be >= {low}, got {getattr(self, name)}")

    def __init__(self, n_chains: int = Config.n_chains, chain_len: int = Config.chain_len,
                 n_queries: int = Config.n_queries, **_):
        self.Config(n_chains, chain_len, n_queries).check()
        self.n_chains, self.chain_len, self.n_queries = n_chains, chain_len, n_queries
        self.n_nodes = n_chains * chain_len
        self.sep = self.n_nodes
        self.vocab_size = self.n_nodes + 1
        self.seq_len = self.n_nodes + 1 + n_queries

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        b, n, c, length = batch_size, self.n_nodes, self.n_chains, self.chain_len
        labels = torch.argsort(torch.rand(b, n, generator=generator), dim=1).view(b, c, length)
        parents = torch.empty(b, n, dtype=torch.long)
        parent_labels = torch.cat([labels[:, :, :1], labels[:, :, :-1]], dim=2)  # root -> itself
        parents.scatter_(1, labels.reshape(b, n), parent_labels.reshape(b, n))
        roots = torch.empty(b, n, dtype=torch.long)
        roots.scatter_(1, labels.reshape(b, n),
                       labels[:, :, :1].expand(b, c, length).reshape(b, n))
        # queries: non-root nodes (depth 1 .. chain_len - 1)
        depth_idx = torch.randint(1, length, (b, self.n_queries), generator=generator)
        chain_idx = torch.randint(0, c, (b, self.n_queries), generator=generator)
        queries = labels[torch.arange(b)[:, None], chain_idx, depth_idx]
        sep = torch.full((b, 1), self.sep, dtype=torch.long)
        inputs = torch.cat([parents, sep, queries], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, n + 1:] = roots.gather(1, queries)
        hops = torch.full((length - 1, b, inputs.shape[1]), IGNORE, dtype=torch.long)
        node = queries
        for r in range(length - 1):  # hops[r]: the ancestor r + 1 steps up (a root stays put)
            node = parents.gather(1, node)
            hops[r, :, n + 1:] = node
        return Batch(inputs, targets, hops)


@register_task("chain")
class ChainTask(Task):
    """Variable chasing: follow `hops` assignments from a query variable to a constant.

    Tokens: 0 '=', 1 ';', 2 '?', constants c0..c4 (3..7), variables x0.. (8..). Each sequence
    holds 1 + n_distractors chains of `hops` distinct variables, v_0 = v_1 ; v_1 = v_2 ; ... ;
    v_{hops-1} = c, every chain as long as the queried one and ending in a random constant.
    The (1 + n_distractors) * hops assignments `lhs = rhs ;` appear in random order, then
    `? v_0` with v_0 the head of the first chain. The answer, at the last position, is the
    constant reached after `hops` dereferences; hop_targets[r - 1] (r = 1..hops) holds the value
    after r dereferences (v_r, and the constant for r = hops).

    seq_len = 4 (1 + n_distractors) hops + 2. Variable names come from a pool of 24 (vocab 32)
    while the chains fit in it (e.g. hops 8 with 2 distractors); longer chains enlarge the pool
    by exactly the names they need, keeping every existing token id.

    Hop extrapolation at a fixed length: with `statements` > 0 every sequence holds exactly that
    many assignments, the queried chain's h first, the rest cut into distractor chains of
    `hops` assignments (the last one shorter), so task.eval.hops=8 after hops=4 asks for twice
    the hops in sequences of the same length (n_distractors is then unused). With min_hops > 0
    each row draws its own h ~ U{min_hops..hops} (its hop_targets past h hold its answer), and
    loops_per_hop > 0 asks for h * loops_per_hop iterations per row (Batch.loops, trained with
    train.loop_sampling.sampler=task): the loop count grows with the hops, as Fan et al. grow it
    with the length.
    """

    EQ, SEMI, QUERY = 0, 1, 2
    N_CONSTS = 5
    MIN_POOL = 24

    @dataclass
    class Config:
        hops: int = 4  # assignments to follow (the most, with min_hops)
        n_distractors: int = 2  # chains besides the queried one (statements=0 only)
        statements: int = 0  # > 0: this many assignments in every sequence, whatever the hops
        min_hops: int = 0  # > 0: each row's hops ~ U{min_hops..hops}; 0: every row `hops`
        loops_per_hop: int = 0  # > 0: each row asks for hops * this iterations (Batch.loops)

        def check(self, cfg=None) -> None:
            if self.hops < 1:
                raise knob_error("chain", f"hops must be >= 1, got {self.hops}")
            if self.n_distractors < 0:
                raise knob_error("chain", f"n_distractors must be >= 0, got {self.n_distractors}")
            if self.statements and self.statements < self.hops:
                raise knob_error("chain", f"statements must be 0 or >= hops={self.hops}, got "
                                 f"{self.statements}")
            if self.statements < 0:
                raise knob_error("chain", f"statements must be >= 0, got {self.statements}")
            if not 0 <= self.min_hops <= self.hops:
                raise knob_error("chain", f"min_hops must be in [0, hops={self.hops}], got "
                                 f"{self.min_hops}")
            if self.loops_per_hop < 0:
                raise knob_error("chain", f"loops_per_hop must be >= 0, got {self.loops_per_hop}")

    def __init__(self, hops: int = Config.hops, n_distractors: int = Config.n_distractors,
                 statements: int = Config.statements, min_hops: int = Config.min_hops,
                 loops_per_hop: int = Config.loops_per_hop, **_):
        self.Config(hops, n_distractors, statements, min_hops, loops_per_hop).check()
        self.hops, self.n_chains = hops, n_distractors + 1
        self.statements, self.min_hops, self.loops_per_hop = statements, min_hops, loops_per_hop
        self.n_assign = statements or self.n_chains * hops
        self.const0 = 3
        self.var0 = self.const0 + self.N_CONSTS
        self.n_vars = max(self.MIN_POOL, self.n_assign)
        self.vocab_size = self.var0 + self.n_vars
        self.seq_len = 4 * self.n_assign + 2

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        if self.statements or self.min_hops or self.loops_per_hop:
            return self._sample_slots(batch_size, generator)
        b, c, h, n = batch_size, self.n_chains, self.hops, self.n_assign
        names = torch.argsort(torch.rand(b, self.n_vars, generator=generator), dim=1)[:, :n]
        chains = (names + self.var0).view(b, c, h)  # chains[:, k, j] = v_j of chain k
        consts = torch.randint(0, self.N_CONSTS, (b, c, 1), generator=generator) + self.const0
        values = torch.cat([chains[:, :, 1:], consts], dim=2)  # what each variable is set to
        order = torch.argsort(torch.rand(b, n, generator=generator), dim=1)
        lhs = chains.reshape(b, n).gather(1, order)
        rhs = values.reshape(b, n).gather(1, order)
        stmts = torch.stack([lhs, torch.full_like(lhs, self.EQ), rhs,
                             torch.full_like(lhs, self.SEMI)], dim=2).reshape(b, 4 * n)
        query = torch.stack([torch.full((b,), self.QUERY, dtype=torch.long), chains[:, 0, 0]], 1)
        inputs = torch.cat([stmts, query], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -1] = consts[:, 0, 0]
        hop_targets = torch.full((h, b, inputs.shape[1]), IGNORE, dtype=torch.long)
        hop_targets[:, :, -1] = values[:, 0, :].T  # r dereferences: v_r, then the constant
        return Batch(inputs, targets, hop_targets)

    def _sample_slots(self, batch_size: int, generator: torch.Generator) -> Batch:
        """Rows of their own hop counts: n slots hold the variables in chain order, the queried
        chain in slots 0..h-1, then distractor chains of `hops` slots; a slot's value is the
        next slot's variable, or a constant where its chain ends."""
        b, n, top = batch_size, self.n_assign, self.hops
        names = torch.argsort(torch.rand(b, self.n_vars, generator=generator), dim=1)[:, :n]
        names = names + self.var0  # (B, n): the variable of each slot
        h = (torch.randint(self.min_hops, top + 1, (b,), generator=generator) if self.min_hops
             else torch.full((b,), top))
        consts = torch.randint(0, self.N_CONSTS, (b, n), generator=generator) + self.const0
        slot = torch.arange(n)[None]  # (1, n)
        after = slot - h[:, None]  # distractor slots count from 0
        ends = (slot == h[:, None] - 1) | ((after >= 0) & (after % top == top - 1)) | (slot == n - 1)
        following = torch.cat([names[:, 1:], names[:, :1]], dim=1)
        values = torch.where(ends, consts, following)  # (B, n)
        order = torch.argsort(torch.rand(b, n, generator=generator), dim=1)
        lhs, rhs = names.gather(1, order), values.gather(1, order)
        stmts = torch.stack([lhs, torch.full_like(lhs, self.EQ), rhs,
                             torch.full_like(lhs, self.SEMI)], dim=2).reshape(b, 4 * n)
        query = torch.stack([torch.full((b,), self.QUERY, dtype=torch.long), names[:, 0]], 1)
        inputs = torch.cat([stmts, query], dim=1)
        # r dereferences (r = 1..hops) reach slot min(r, h) - 1's value: the answer past h
        reached = torch.minimum(torch.arange(1, top + 1)[:, None], h[None]) - 1  # (hops, B)
        step_values = values.gather(1, reached.T).T  # (hops, B)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, -1] = values.gather(1, (h - 1)[:, None])[:, 0]
        hop_targets = torch.full((top, b, inputs.shape[1]), IGNORE, dtype=torch.long)
        hop_targets[:, :, -1] = step_values
        loops = h * self.loops_per_hop if self.loops_per_hop else None
        return Batch(inputs, targets, hop_targets, loops)


@register_task("phop")
class PHopTask(Task):
    """p-hop induction (Sanford et al. 2024; Saunshi et al. 2025), p = `hops`.

    The input is x_0 .. x_{N-1} (N = `length`) over tokens 0..alphabet-1. With
    find(i) = 1 + max{j < i : x_j = x_i} (the position right after the previous occurrence of
    x_i, one induction-head step), the answer is x at find^p(N - 1), predicted at the last
    position; hop_targets[r - 1] (r = 1..p) is x at find^r(N - 1) (the answer for r = p).

    "No previous occurrence" never happens, by construction:
      * no two adjacent tokens are equal, so find(i) < i (no hop stands still);
      * the sequence is drawn right to left, uniformly among the tokens that differ from the
        right neighbour. While hop r (r = 0..p-1) searches for its token leftwards, a position
        q = p - r - 1 (the last that leaves one position per remaining hop) is set to the searched
        token instead of drawn. Only rows that would otherwise run out of room are changed; they
        are rare when length is well above p times the mean hop distance (~alphabet).
    Needs length >= hops + 2. seq_len = length, vocab_size = alphabet. With min_hops > 0 each
    row draws its own p ~ U{min_hops..hops} (a range of difficulties in training; the held-out
    split's task.eval.hops scores beyond it); hop_targets past a row's p hold its answer.
    Nothing in the input says p, so a range of p needs loops_per_hop: the row's loop count
    p * loops_per_hop (Batch.loops, trained with train.loop_sampling.sampler=task) is how it is
    told.
    """

    @dataclass
    class Config:
        hops: int = 4  # p
        length: int = 64  # sequence length (long enough that p hops rarely run out of room)
        alphabet: int = 4  # tokens in the sequence's alphabet
        min_hops: int = 0  # > 0: each row's p ~ U{min_hops..hops}; 0: every row `hops`
        loops_per_hop: int = 0  # > 0: each row asks for p * this iterations (Batch.loops)

        def check(self, cfg=None) -> None:
            hops, length, alphabet = self.hops, self.length, self.alphabet
            if hops < 1:
                raise knob_error("phop", f"hops must be >= 1, got {hops}")
            if not 0 <= self.min_hops <= hops:
                raise knob_error("phop", f"min_hops must be in [0, hops={hops}], got "
                                 f"{self.min_hops}")
            if self.loops_per_hop < 0:
                raise knob_error("phop", f"loops_per_hop must be >= 0, got {self.loops_per_hop}")
            if self.min_hops and not self.loops_per_hop:
                raise knob_error("phop", "min_hops needs loops_per_hop > 0: nothing in the input "
                                 "says a row's p, its loop count must")
            if alphabet < 2:
                raise knob_error("phop", f"alphabet must be >= 2, got {alphabet}")
            if length < hops + 2:
                raise knob_error("phop", f"length must be >= hops + 2 = {hops + 2}, got {length}")

    def __init__(self, hops: int = Config.hops, length: int = Config.length,
                 alphabet: int = Config.alphabet, min_hops: int = Config.min_hops,
                 loops_per_hop: int = Config.loops_per_hop, **_):
        self.Config(hops, length, alphabet, min_hops, loops_per_hop).check()
        self.hops, self.length, self.alphabet, self.min_hops = hops, length, alphabet, min_hops
        self.loops_per_hop = loops_per_hop
        self.vocab_size = alphabet
        self.seq_len = length

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        b, n, k, p = batch_size, self.length, self.alphabet, self.hops
        first = torch.randint(0, k, (b,), generator=generator)
        draws = torch.randint(0, k - 1, (b, n), generator=generator)  # one per position
        x = torch.empty(b, n, dtype=torch.long)
        x[:, -1] = first
        target = first.clone()  # the token the current hop looks for
        row_p = (torch.randint(self.min_hops, p + 1, (b,), generator=generator)
                 if self.min_hops else torch.full((b,), p))
        left = row_p.clone()  # hops still to do, the current one included
        hop_pos = torch.empty(p, b, dtype=torch.long)  # hop_pos[r - 1] = find^r(N - 1)
        rows = torch.arange(b)
        for q in range(n - 2, -1, -1):
            prev = x[:, q + 1]
            tok = draws[:, q] + (draws[:, q] >= prev).long()  # uniform over tokens != prev
            searching = left > 0
            tok = torch.where(searching & (left - 1 == q), target, tok)
            x[:, q] = tok
            found = searching & (tok == target)
            if found.any():
                r = (row_p - left)[found]  # this hop's index: find^(r + 1)(N - 1) = q + 1
                hop_pos[r, rows[found]] = q + 1
                target = torch.where(found, prev, target)  # the next hop looks for x_{q+1}
                left = left - found.long()
        assert bool((left == 0).all())
        past = torch.arange(p)[:, None] >= row_p[None]  # hops beyond a row's p: its answer
        hop_pos = torch.where(past, hop_pos.gather(0, (row_p - 1)[None].expand(p, b)), hop_pos)
        hop_tok = x.gather(1, hop_pos.T).T  # (p, B)
        targets = torch.full_like(x, IGNORE)
        targets[:, -1] = hop_tok[-1]
        hop_targets = torch.full((p, b, n), IGNORE, dtype=torch.long)
        hop_targets[:, :, -1] = hop_tok
        loops = row_p * self.loops_per_hop if self.loops_per_hop else None
        return Batch(x, targets, hop_targets, loops)


@register_task("addition")
class AdditionTask(Task):
    """Multi-digit addition, digits reversed (least significant first).

    Tokens: digits 0..9, 10 '+', 11 '='. The input is `a_0..a_{d-1} + b_0..b_{d-1} =
    c_0..c_d` (d = `digits`, operand digits uniform, leading zeros allowed; c = a + b written
    with d + 1 digits). Answers are the d + 1 result digits, read as next-token predictions:
    the target at '=' is c_0 and the target at c_k is c_{k+1}, so the input at an answer
    position holds only earlier result digits. seq_len = 3 d + 3, vocab_size = 12.
    """

    PLUS, EQ = 10, 11

    @dataclass
    class Config:
        digits: int = 5  # digits per operand

        def check(self, cfg=None) -> None:
            if self.digits < 1:
                raise knob_error("addition", f"digits must be >= 1, got {self.digits}")

    def __init__(self, digits: int = Config.digits, **_):
        self.Config(digits).check()
        self.digits = digits
        self.vocab_size = 12
        self.seq_len = 3 * digits + 3

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        b, d = batch_size, self.digits
        ab = torch.randint(0, 10, (b, 2, d), generator=generator)
        total = ab[:, 0] + ab[:, 1]  # digit-wise sums, then propagate carries
        c = torch.empty(b, d + 1, dtype=torch.long)
        carry = torch.zeros(b, dtype=torch.long)
        for i in range(d):
            s = total[:, i] + carry
            c[:, i], carry = s % 10, s // 10
        c[:, d] = carry
        col = torch.full((b, 1), 0, dtype=torch.long)
        inputs = torch.cat([ab[:, 0], col + self.PLUS, ab[:, 1], col + self.EQ, c], dim=1)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, 2 * d + 1:3 * d + 2] = c
        return Batch(inputs, targets)
