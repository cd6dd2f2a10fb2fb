"""The model's memory: CMS levels of low-rank experts beside the MLP of chosen decoder layers.

At every targeted decoder layer a `LayerMemory` runs in parallel with the layer's MLP (attached
as `layer.memory`, added to the MLP's output by a forward hook, so backbone parameter names never
change). It holds one `ExpertPool` per CMS level (level 1 = fastest). A pool pre-allocates
`capacity` low-rank experts (A: d x r, B: r x d) and masks the inactive ones, so tensor shapes
never change as experts are activated or pruned (the paper's own implementation note):

    out(h) = MLP(h) + sum_l sum_{e in TopK_l(h)} g_e(h) * scale * (h A_e) B_e

Blocks (`memory.blocks`, discriminant routers, the slowest level): an expert's rank is split
into blocks, each with its own router row; the expert scores as its best block and only that
block adds to the input, g_e(h) * scale * (h A_e) diag(m_e(h)) B_e with m_e one block's 0/1
rank mask. A consolidation that prunes a level routed top-1 puts each source in its own block.

Routers: "cosine" scores cos(h, key_e) / temperature with a key fixed from the hidden states an
expert was seeded on (it cannot drift onto old tasks' inputs); "discriminant" scores w_e . h + b_e,
the linear discriminant that tells apart the data the level's experts hold, refit at every
consolidation (`discriminant_router`); "linear" is a router row trained by gradient. Random
expert injection (dreams) adds one random active expert per router, behind a tensor-valued switch
(`inject` buffer) so the same module can run inside vLLM.

Level gate (`memory.level_gate`, discriminant routers): one discriminant over the experts of
every level, the fast level's class being its current window. An input goes to the memory that
holds it: where an expert of level l wins, the levels faster than l stay out of the input
(what they hold was written after that knowledge was consolidated; `level_mask`). Wake inputs
are the fast level's by definition, so inside `wake_inputs` every level routes on its own.
Gate scope "winner" (`memory.gate_scope`): only the winning level takes part, and on wake inputs
only the fast level, so each memory learns and answers its own inputs alone.
With `memory.backbone_class` the backbone is the slowest class: where what it says by itself
(its own samples) is nearest, no level adds anything.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sleep_ray.config import MemoryConfig


class PoolFullError(RuntimeError):
    """Expansion was asked of a level whose pool has no free expert slot."""


def _expert_seed(base_seed: int, layer: int, level: int, expert: int) -> int:
    """A stable seed per (model seed, layer, level, expert): 'initial state' is reproducible."""
    digest = hashlib.sha256(f"{base_seed}/{layer}/{level}/{expert}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def low_rank_sum(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (A, B) of sum_i w_i A_i B_i (A_i (d, r_i), B_i (r_i, d)).

    The stacked factors are reduced by a QR of each side and an SVD of the small core (R x R,
    R = sum r_i), never a d x d matrix; the singular values are split evenly between A and B.
    With one input of rank <= `rank` and weight 1 the result has the same product A B.
    """
    left = torch.cat([a.float() * w for (a, _), w in zip(factors, weights)], dim=1)  # (d, R)
    right = torch.cat([b.float() for _, b in factors], dim=0)  # (R, d)
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)  # the core, (R, R)
    k = min(rank, len(s))
    root = s[:k].sqrt()
    a = torch.zeros(left.shape[0], rank)
    b = torch.zeros(rank, right.shape[1])
    a[:, :k] = q1 @ u[:, :k] * root
    b[:k] = root[:, None] * (vh[:k] @ q2.T)
    dtype = factors[0][0].dtype
    return a.to(dtype), b.to(dtype)


@torch.no_grad()
def fit_low_rank(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, rank: int,
                 ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (A, B) of the map that reproduces targets Y from inputs X, pulled
    toward `prior` where X says nothing:

        D* = argmin ||X D - Y||^2 + lam ||D - prior||^2,   lam = ridge * trace(X^T X) / d
           = (X^T X + lam I)^-1 (X^T Y + lam prior)

    from the sufficient statistics `gram` = X^T X and `cross` = X^T Y (d x d each). D* is then
    truncated to rank `rank` in the same metric (W = X^T X + lam I, W = L L^T; the best rank-r
    approximation of L^T D* from its SVD), so the error is counted on the data, not on unused
    directions of the input space. Singular values are split evenly between A and B.
    """
    d = gram.shape[0]
    gram, cross, prior = gram.double(), cross.double(), prior.double()
    lam = ridge * float(torch.trace(gram)) / d
    if lam <= 0:
        lam = 1e-8
    w = gram + lam * torch.eye(d, dtype=gram.dtype)
    best = torch.linalg.solve(w, cross + lam * prior)  # (d, d)
    chol = torch.linalg.cholesky(w)  # W = L L^T
    u, s, vh = torch.linalg.svd(chol.T @ best)
    k = min(rank, len(s))
    root = s[:k].sqrt()
    a = torch.zeros(d, rank, dtype=torch.float64)
    b = torch.zeros(rank, d, dtype=torch.float64)
    a[:, :k] = torch.linalg.solve_triangular(chol.T, u[:, :k] * root, upper=True)
    b[:k] = root[:, None] * vh[:k]
    return a.float(), b.float()


@torch.no_grad()
def discriminant_router(sums: torch.Tensor, counts: torch.Tensor, second: torch.Tensor,
                        ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant analysis from sufficient statistics: E classes (the experts of one
    level), each with the sum (E, d) and count (E,) of its route inputs x, and the sum of x x^T
    over all of them (d, d). Returns rows W (E, d) and biases b (E,) of the scores

        s_e(x) = mu_e^T S^-1 x - 1/2 mu_e^T S^-1 mu_e,   S = within-class covariance + lam I,

    the Gaussian log-likelihood of class e up to a term shared by all classes (equal priors), so
    argmax_e s_e(x) is the nearest class mean in the metric S^-1: directions along which every
    class varies (what all tasks' inputs have in common: format, position) count little, those
    that set the classes apart count much. lam = ridge * trace(within) / d shrinks S toward a
    multiple of I (Ledoit-Wolf style) so that d > samples stays solvable.
    """
    sums, counts, second = sums.double(), counts.double(), second.double()
    num, d = sums.shape
    means = sums / counts.clamp_min(1.0)[:, None]
    within = (second - (means.T * counts) @ means) / max(float(counts.sum()) - num, 1.0)
    lam = max(ridge * float(torch.trace(within)) / d, 1e-12)
    rows = torch.linalg.solve(within + lam * torch.eye(d, dtype=within.dtype), means.T).T  # (E, d)
    bias = -0.5 * (rows * means).sum(-1)
    return rows.float(), bias.float()


def level_mask(best: torch.Tensor, winner_only: bool = False) -> torch.Tensor:
    """(..., L) each level's best router score (the dtype's minimum where it has no fitted
    class) -> (..., L) 0/1: level l takes part iff it is not faster than the level of the best
    score over all (`winner_only`: iff it is that level). Where no level has a fitted class
    every level takes part (ties go to the faster level)."""
    winner = best.argmax(-1, keepdim=True)  # (..., 1)
    levels = torch.arange(best.shape[-1], device=best.device)
    if not winner_only:
        return (levels >= winner).to(best.dtype)
    none = (best == torch.finfo(best.dtype).min).all(-1, keepdim=True)
    return ((levels == winner) | none).to(best.dtype)


def block_groups(sources: int, blocks: int) -> list[list[int]]:
    """Which of `sources` (in order) each block of an expert takes: contiguous groups of sizes
    as even as possible, the earlier groups the larger, one source per block while they fit."""
    n = min(sources, blocks)
    sizes = [sources // n + (i < sources % n) for i in range(n)] if n else []
    starts = [sum(sizes[:i]) for i in range(n)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


def block_mask(choice: torch.Tensor, rank: int) -> torch.Tensor:
    """(..., E, P) one-hot block choice -> (..., E, rank) 0/1 mask of the chosen block's rows."""
    return choice.repeat_interleave(rank // choice.shape[-1], dim=-1)


class ExpertPool(nn.Module):
    """One CMS level's experts at one layer: `capacity` low-rank experts, a router, a mask."""

    def __init__(self, dim: int, cfg: MemoryConfig, level: int, layer: int, seed: int):
        super().__init__()
        self.dim, self.rank, self.level, self.layer, self.seed = dim, cfg.level_rank(level), level, layer, seed
        self.blocks = cfg.level_blocks(level)
        self.capacity = cfg.capacity[level - 1]
        self.top_k = cfg.top_k[level - 1]
        self.router_kind = cfg.router
        self.temperature = cfg.router_temperature
        self.center_keys = cfg.center_keys
        self.inject_share = cfg.inject_share
        self.scale = cfg.scale
        self.init_std = cfg.init_std
        self.sequence_routing = cfg.routing == "sequence"
        self.prompt_routing = cfg.prompt_routing  # whole prompts at inference (`inference_routing`)
        self.A = nn.ParameterList(nn.Parameter(torch.empty(dim, self.rank)) for _ in range(self.capacity))
        self.B = nn.ParameterList(nn.Parameter(torch.empty(self.rank, dim)) for _ in range(self.capacity))
        # Router entry per expert: fixed prototype keys (cosine; (P, d), rows of zeros unused), a
        # trained row (linear; (1, d)) or discriminant rows, one per block ((blocks, d)).
        self.prototypes = cfg.router_prototypes if cfg.router == "cosine" else self.blocks
        self.router = nn.ParameterList(nn.Parameter(torch.empty(self.prototypes, dim))
                                       for _ in range(self.capacity))
        # Score offset of each discriminant row (zero for the other routers): (E,), or (E, blocks).
        self.register_buffer("router_bias", torch.zeros(self.capacity, self.blocks).squeeze(-1))
        self.register_buffer("active", torch.zeros(self.capacity, dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(self.capacity))  # routed gate mass, for merging
        self.register_buffer("inject", torch.zeros((), dtype=torch.bool))  # random-expert switch
        self.track_usage = False
        # Shared routing (`memory.shared_routing`, see `link_routing`): the first memory layer's
        # pool of this level decides (`routes`) and leaves its gates in `shared` for the others.
        self.routes = True
        self.shared: dict[int, torch.Tensor] | None = None
        self.route_mask: torch.Tensor | None = None  # (B, T_total) real tokens, sequence routing
        # An engine that keeps each request's running prefix sums itself (vLLM's flat batch:
        # `engines/vllm_model.py`) gives sequence routing's route inputs here: x -> prefix means.
        self.prefix_source: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Level gate: the scores the layer computed for this call and whether this level takes
        # part, (B, T, 1); set by `LayerMemory.forward` and used once by `routed_gates`.
        self.decision: tuple[torch.Tensor, torch.Tensor] | None = None
        self._seq_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.continues_prefix = False  # inside `continued_prefix`: every call continues it
        self.whole_prompt = False  # inside `whole_prompt_routing`
        # Blocks: the one-hot block choice (B, T, E, blocks) of the last routed scores.
        self.block_choice: torch.Tensor | None = None
        for e in range(self.capacity):
            self.reset_expert(e)
        for p in self.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ state changes

    @torch.no_grad()
    def reset_expert(self, e: int) -> None:
        """Return expert e to its initial state: A from its own seed, B and router entry zero.

        B = 0 makes a fresh expert contribute exactly nothing until trained, so the student of
        a consolidation starts as the model after the transition.
        """
        g = torch.Generator().manual_seed(_expert_seed(self.seed, self.layer, self.level, e))
        a = torch.randn(self.dim, self.rank, generator=g) * self.init_std
        self.A[e].copy_(a.to(self.A[e]))
        self.B[e].zero_()
        self.router[e].zero_()
        self.router_bias[e] = 0.0
        self.active[e] = False
        self.usage[e] = 0.0

    def free_slot(self) -> int | None:
        free = (~self.active).nonzero().flatten()
        return int(free[0]) if len(free) else None

    @torch.no_grad()
    def activate(self, e: int, key: torch.Tensor | None = None) -> None:
        """Make expert e routable; a cosine router gets its keys from `key`: (d,) or (n, d), of
        which at most `prototypes` rows, evenly spaced, are kept."""
        self.reset_expert(e)
        if key is not None:
            self.set_keys(e, key)
        self.active[e] = True

    @torch.no_grad()
    def set_keys(self, e: int, keys: torch.Tensor) -> None:
        keys = keys.reshape(-1, self.dim)  # (n, d)
        keys = keys[(keys.abs().sum(-1) > 0)]
        if len(keys) > self.prototypes:
            keys = keys[torch.linspace(0, len(keys) - 1, self.prototypes).round().long()]
        self.router[e].zero_()
        self.router[e][:len(keys)].copy_(keys.to(self.router[e]))

    @torch.no_grad()
    def set_router(self, e: int, row: torch.Tensor, bias: float, block: int = 0) -> None:
        """Expert e's discriminant router entry (of one of its blocks): score w . x + bias (see
        `discriminant_router`)."""
        self.router[e][block].copy_(row.to(self.router[e]))
        self.router_bias.view(self.capacity, -1)[e, block] = bias

    @torch.no_grad()
    def set_delta(self, e: int, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Load expert e's factors (A (d, r), B (r, d)), e.g. a copy or merge of others."""
        self.A[e].copy_(factors[0].to(self.A[e]))
        self.B[e].copy_(factors[1].to(self.B[e]))

    def factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (A, B), detached copies: its delta is scale * A @ B."""
        return self.A[e].detach().clone(), self.B[e].detach().clone()

    @torch.no_grad()
    def merge(self, keep: int, drop: int) -> None:
        """Merge expert `drop` into `keep` and free `drop`'s slot (rank-r truncation of the sum,
        see `low_rank_sum`); the router entry is the usage-weighted mean of the two. Experts of
        several blocks merge block by block (a block only one of them uses is taken whole)."""
        if self.blocks > 1:
            self.merge_blocks(keep, drop)
            return
        merged = low_rank_sum([self.factors(keep), self.factors(drop)], [1.0, 1.0], self.rank)
        self.set_delta(keep, merged)
        total = self.usage[keep] + self.usage[drop]
        if self.prototypes > 1:  # the merged expert answers to (a sample of) both's prototypes
            self.set_keys(keep, torch.cat([self.router[keep], self.router[drop]]))  # (2P, d) in
        else:
            w = self.usage[keep] / total if total > 0 else torch.tensor(0.5)
            self.router[keep].copy_(w * self.router[keep] + (1 - w) * self.router[drop])
            self.router_bias[keep] = w * self.router_bias[keep] + (1 - w) * self.router_bias[drop]
        self.usage[keep] = total
        self.reset_expert(drop)

    @torch.no_grad()
    def merge_blocks(self, keep: int, drop: int) -> None:
        total = self.usage[keep] + self.usage[drop]
        w = self.usage[keep] / total if total > 0 else torch.tensor(0.5)
        width = self.rank // self.blocks
        bias = self.router_bias.view(self.capacity, -1)
        (a, b), (a2, b2) = self.factors(keep), self.factors(drop)
        for k in range(self.blocks):
            rows = slice(k * width, (k + 1) * width)
            mine, theirs = (bool(self.router[e][k].abs().sum() > 0) for e in (keep, drop))
            if mine and theirs:
                a[:, rows], b[rows] = low_rank_sum([(a[:, rows], b[rows]), (a2[:, rows], b2[rows])],
                                                   [1.0, 1.0], width)
                self.router[keep][k].copy_(w * self.router[keep][k] + (1 - w) * self.router[drop][k])
                bias[keep, k] = w * bias[keep, k] + (1 - w) * bias[drop, k]
            elif theirs:
                a[:, rows], b[rows] = a2[:, rows], b2[rows]
                self.router[keep][k].copy_(self.router[drop][k])
                bias[keep, k] = bias[drop, k]
        self.set_delta(keep, (a, b))
        self.usage[keep] = total
        self.reset_expert(drop)

    # ------------------------------------------------------------------ forward

    def route_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> what the router scores: the token itself, or the causal prefix mean.

        The prefix mean skips padding: `route_mask` (B, T_total), set from the model's
        attention mask by a pre-hook (see `attach_memory`), marks the real tokens; its last T
        columns belong to this call.
        """
        if not self.sequence_routing:
            return x
        if self.prefix_source is not None:
            return self.prefix_source(x)
        m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        if self.route_mask is not None and self.route_mask.shape[0] == x.shape[0]:
            m = self.route_mask[:, -x.shape[1]:].to(x.dtype)
        m = m[..., None]  # (B, T, 1)
        csum = (x * m).cumsum(dim=1)  # (B, T, d)
        count = m.cumsum(dim=1)  # (B, T, 1)
        if torch.is_grad_enabled():  # teacher-forced: the whole sequence is in this call
            return csum / count.clamp_min(1.0)
        # Generation (no grad): a one-token call continues the running mean of the prompt and of
        # the tokens generated so far; any longer call is a new prefill and starts afresh, except
        # inside `continued_prefix` (continuations on a prompt's KV cache).
        continues = ((x.shape[1] == 1 or self.continues_prefix) and self._seq_state is not None
                     and len(self._seq_state[0]) == len(x))
        if continues:
            prev_sum, prev_count = self._seq_state
            csum, count = csum + prev_sum, count + prev_count
        self._seq_state = (csum[:, -1:], count[:, -1:])
        if self.whole_prompt and not continues:  # a prompt's every token routes as its last
            return (csum[:, -1:] / count[:, -1:].clamp_min(1.0)).expand_as(x)
        return csum / count.clamp_min(1.0)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, E) router scores, the dtype's minimum for inactive experts. Under
        sequence routing this advances the running prefix mean of generation: once per call."""
        return self.route_scores(self.route_input(x))

    def route_scores(self, r: torch.Tensor) -> torch.Tensor:
        """Router scores of route inputs r (`route_input`): (B, T, d) -> (B, T, E)."""
        keys = torch.stack(list(self.router))  # (E, P, d)
        if self.router_kind == "cosine":
            scores = self.prototype_scores(r, keys)
        elif self.blocks > 1:
            scores = self.block_scores(r, keys)
        else:
            scores = r @ keys[:, 0].T  # (B, T, E)
            if self.router_kind == "discriminant":
                scores = scores + self.router_bias.to(scores.dtype)
        return scores.masked_fill(~self.active, torch.finfo(scores.dtype).min)

    def block_scores(self, r: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Discriminant scores of experts of several blocks: (B, T, d), (E, P, d) -> (B, T, E),
        each expert its best used block's (0 where none is used); the one-hot choice of that
        block is left in `block_choice` (B, T, E, P)."""
        bias = self.router_bias.to(r.dtype)  # (E, P)
        s = torch.einsum("btd,epd->btep", r, keys.to(r.dtype)) + bias
        used = keys.abs().sum(-1) > 0  # (E, P)
        best = s.masked_fill(~used, torch.finfo(s.dtype).min).max(-1)
        blocks = torch.arange(self.blocks, device=r.device)
        self.block_choice = (best.indices[..., None] == blocks).to(r.dtype)
        return torch.where(used.any(-1), best.values, torch.zeros_like(best.values))

    def fitted(self) -> torch.Tensor:
        """(E,) bool: active experts whose router entry was fitted (a nonzero row)."""
        return self.active & (torch.stack(list(self.router)).abs().sum((-1, -2)) > 0)

    def gates(self, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, E) gate weights; zero for unselected and inactive experts."""
        scores = self.scores(x) if scores is None else scores
        neg = torch.finfo(scores.dtype).min
        k = min(self.top_k, self.capacity)
        top = scores.topk(k, dim=-1).indices
        selected = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True) & self.active
        logits = scores.masked_fill(~selected, neg)
        if self.router_kind == "linear":
            # A learned row competes with an implicit "no expert" logit of 0, so the gate keeps
            # a gradient even when one expert is selected (a softmax over one entry is always 1).
            null = torch.zeros_like(logits[..., :1])
            weights = torch.cat([logits, null], dim=-1).softmax(dim=-1)[..., :-1]
        else:
            weights = logits.softmax(dim=-1)
        weights = weights * selected  # exact zeros off the selection: zero output, zero gradient
        if self.inject:
            weights = self.inject_random_expert(weights, selected)
        return weights

    def prototype_scores(self, r: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, T, d), (E, P, d) -> (B, T, E): the best cosine / temperature of each expert's
        prototypes (an all-zero row is unused; an expert without any scores 0).

        With `center_keys`, inputs and prototypes are compared after subtracting the mean of
        the level's active prototypes: hidden states share a large common direction, so raw
        cosines of inputs of one format are all close to 1. Several prototypes per expert (the
        inputs it was seeded on) let an input reach the expert that saw *its* entity, where one
        mean key per expert only tells the tasks' average inputs apart.
        """
        used = (keys.abs().sum(-1) > 0) & self.active[:, None]  # (E, P)
        if self.center_keys and bool(used.any()):
            center = keys[used].mean(0)  # (d,)
            keys, r = keys - center, r - center
        cos = F.normalize(r, dim=-1) @ F.normalize(keys, dim=-1).flatten(0, 1).T  # (B, T, E*P)
        cos = cos.unflatten(-1, keys.shape[:2]).masked_fill(~used, -2.0)  # (B, T, E, P)
        best = cos.max(-1).values  # (B, T, E)
        return torch.where(used.any(-1), best, torch.zeros_like(best)) / self.temperature

    def inject_random_expert(self, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Random expert injection (dreams): one active expert that routing did not select,
        drawn uniformly per token, takes a fixed `inject_share` of the level's gate mass (a
        softmax share of a far-away key can be ~0 and change nothing). Where the level has no
        such expert the gates are unchanged. (B, T, E) -> (B, T, E)."""
        noise = torch.rand(weights.shape, device=weights.device)
        noise = noise.masked_fill(~(self.active & ~selected), -1.0)
        has_extra = noise.max(-1, keepdim=True).values >= 0  # (B, T, 1): any candidate left
        extra = F.one_hot(noise.argmax(-1), self.capacity).to(weights.dtype) * has_extra
        share = self.inject_share * has_extra.to(weights.dtype)  # (B, T, 1)
        return weights * (1 - share) + extra * share

    def routed_gates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, E): this pool's own gates, or, with shared routing, those the
        routing layer computed for the same tokens in this forward pass."""
        if self.shared is None or self.routes:
            scores, on = self.decision if self.decision is not None else (None, None)
            self.decision = None
            g = self.gates(x, scores)
            g = g if on is None else g * on
            if self.shared is not None:
                self.shared[self.level] = g
                if self.blocks > 1:  # the block choice of the same scores, under key -level
                    self.shared[-self.level] = self.block_choice
            return g
        if self.blocks > 1:
            self.block_choice = self.shared.get(-self.level)
        g = self.shared.get(self.level)
        if g is None or g.shape[:2] != x.shape[:2]:
            raise RuntimeError(f"shared routing: layer {self.layer} level {self.level} ran before "
                               "the routing layer in this forward pass")
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.routed_gates(x)  # (B, T, E)
        if self.track_usage:
            self.usage += g.detach().sum(dim=(0, 1)).to(self.usage)
        A = torch.stack(list(self.A))  # (E, d, r)
        B = torch.stack(list(self.B))  # (E, r, d)
        h = torch.einsum("btd,edr->bter", x, A) * g[..., None]  # (B, T, E, r)
        if self.blocks > 1:  # only the chosen block of each expert
            h = h * block_mask(self.block_choice, self.rank)
        return torch.einsum("bter,erd->btd", h, B) * self.scale


class LayerMemory(nn.Module):
    """The memory of one decoder layer: one expert pool per CMS level, summed."""

    def __init__(self, dim: int, cfg: MemoryConfig, layer: int, seed: int):
        super().__init__()
        self.layer = layer
        self.levels = nn.ModuleList(
            ExpertPool(dim, cfg, level, layer, seed) for level in range(1, cfg.num_levels + 1)
        )
        self._capture: list[torch.Tensor] | None = None
        self.level_gate = cfg.level_gate
        self.winner_only = cfg.gate_scope == "winner"
        self.wake = False  # inside `wake_inputs`: the fast level's inputs (see `decisions`)
        # The backbone's own class in the level gate (`memory.backbone_class`): where it wins,
        # no level adds anything. A zero row is unfitted.
        if cfg.backbone_class:
            self.register_buffer("backbone_row", torch.zeros(dim))
            self.register_buffer("backbone_bias", torch.zeros(()))
        else:
            self.backbone_row = self.backbone_bias = None

    @torch.no_grad()
    def set_backbone(self, row: torch.Tensor, bias: float) -> None:
        """The backbone's discriminant entry: score w . x + bias (see `discriminant_router`)."""
        self.backbone_row.copy_(row.to(self.backbone_row))
        self.backbone_bias.fill_(bias)

    def decisions(self, x: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per level, as the forward pass routes inputs `x` at a layer that routes: the router
        scores it uses (None: the pool scores `x` itself) and whether it takes part (B, T, 1;
        None: everywhere). Without the level gate every level routes on its own. With it, wake
        inputs are the fast level's by definition: every level routes on its own there (gate
        scope "slower") or the fast level alone takes part ("winner"); any other input goes to
        the memory that holds it (`decide`)."""
        if not self.level_gate or (self.wake and not self.winner_only):
            return [(None, None)] * len(self.levels)
        if self.wake:
            off = torch.zeros(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
            return [(None, None)] + [(None, off)] * (len(self.levels) - 1)
        return self.decide(x)

    def decide(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level: its router scores (B, T, E) and whether it takes part (B, T, 1). Every
        level of a layer sees the same route input: the first computes it (advancing its running
        prefix mean in generation) and the others take its state."""
        first = self.levels[0]
        r = first.route_input(x)
        for pool in self.levels[1:]:
            pool._seq_state = first._seq_state
        scores = [pool.route_scores(r) for pool in self.levels]
        neg = torch.finfo(scores[0].dtype).min
        best = [s.masked_fill(~pool.fitted(), neg).max(-1).values for pool, s in zip(self.levels, scores)]
        if self.backbone_row is not None:  # the slowest "level": where it wins, none takes part
            fitted = bool(self.backbone_row.abs().sum() > 0)
            backbone = r @ self.backbone_row.to(r.dtype) + self.backbone_bias.to(r.dtype)
            best.append(backbone if fitted else torch.full_like(backbone, neg))
        on = level_mask(torch.stack(best, dim=-1), self.winner_only)  # (B, T, L or L + 1)
        return [(s, on[..., i:i + 1]) for i, s in enumerate(scores)]

    def gates(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """(B, T, E) gates of 1-based `level` for inputs `x` of this layer, as the forward pass
        routes them when this layer routes (the level gate included)."""
        scores, on = self.decisions(x)[level - 1]
        g = self.levels[level - 1].gates(x, scores)
        return g if on is None else g * on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._capture is not None:
            self._capture.append(x.detach())
        if self.levels[0].routes:
            for pool, decision in zip(self.levels, self.decisions(x)):
                pool.decision = decision
        try:
            return self.run_pools(x)
        finally:
            for pool in self.levels:  # a skipped pool must not keep this call's decision
                pool.decision = None

    def run_pools(self, x: torch.Tensor) -> torch.Tensor:
        pools = list(self.levels)
        if not torch.is_grad_enabled():
            # Without gradients, a pool with no active expert adds exactly zero (its gates are all
            # zero, injection included): skip its routing and einsums. Early in a run most pools
            # are empty, and these small ops are most of the memory's per-step cost in decoding.
            # With gradients every pool runs, so its parameters get zero gradients, not None.
            pools = [pool for pool in pools if bool(pool.active.any())]
            if not pools:
                return torch.zeros_like(x)
        out = pools[0](x)
        for pool in pools[1:]:
            out = out + pool(x)
        return out


def _add_memory_hook(mlp: nn.Module, inputs: tuple, output):
    memory = mlp._sleep_memory  # set by attach_memory; a plain attribute, not a submodule
    if isinstance(output, tuple):  # some MoE blocks return (hidden, router_logits)
        return (output[0] + memory(inputs[0]),) + output[1:]
    return output + memory(inputs[0])


def _route_mask_hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Hand the attention mask to the pools before each forward (sequence routing skips pads)."""
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    for pool in model._sleep_pools:
        pool.route_mask = mask


def link_routing(memories: list[LayerMemory], shared: bool) -> None:
    """With `shared`, the first memory layer routes for every layer: each token reaches the same
    experts at every depth (independent decisions at 30 layers would mix two experts' halves on
    most inputs even at 90% per-layer accuracy). Layers run in order, so the first memory layer
    has always decided before the others read its gates."""
    table: dict[int, torch.Tensor] = {}
    ordered = sorted(memories, key=lambda m: m.layer)
    for i, memory in enumerate(ordered):
        for pool in memory.levels:
            pool.shared = table if shared else None
            pool.routes = i == 0 or not shared


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers` and kin)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"{type(model).__name__}: no decoder layers found (expected model.layers)")


def attach_memory(model: nn.Module, cfg: MemoryConfig, seed: int = 0) -> list[LayerMemory]:
    """Attach a `LayerMemory` to the chosen layers (all if cfg.layers is empty).

    Level 1's first expert (the fast weights) is activated; every other slot starts inactive.
    The backbone is frozen. Works on any decoder whose layers have an `.mlp`.
    """
    layers = decoder_layers(model)
    chosen = cfg.layers or tuple(range(len(layers)))
    dim = model.config.hidden_size
    param = next(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    memories = []
    for idx in chosen:
        layer = layers[idx]
        if not hasattr(layer, "mlp"):
            raise ValueError(f"decoder layer {idx} of {type(model).__name__} has no .mlp")
        memory = LayerMemory(dim, cfg, idx, seed).to(device=param.device, dtype=param.dtype)
        layer.memory = memory
        object.__setattr__(layer.mlp, "_sleep_memory", memory)
        layer.mlp.register_forward_hook(_add_memory_hook)
        memories.append(memory)
    for memory in memories:
        memory.levels[0].activate(0)
    link_routing(memories, cfg.shared_routing)
    if cfg.routing == "sequence":
        object.__setattr__(model, "_sleep_pools", [p for m in memories for p in m.levels])
        model.register_forward_pre_hook(_route_mask_hook, with_kwargs=True)
    return memories


def memories(model: nn.Module) -> list[LayerMemory]:
    return [m for m in model.modules() if isinstance(m, LayerMemory)]


def pools(model: nn.Module, level: int) -> list[ExpertPool]:
    """The pools of 1-based `level` across all memory layers."""
    return [m.levels[level - 1] for m in memories(model)]


def num_levels(model: nn.Module) -> int:
    return len(memories(model)[0].levels)


# ---------------------------------------------------------------------- operations by level


def active_experts(model: nn.Module, level: int) -> list[int]:
    """Active expert slots of `level` (the same in every layer: levels grow in lockstep)."""
    return pools(model, level)[0].active.nonzero().flatten().tolist()


def activate_expert(model: nn.Module, level: int, keys: list[torch.Tensor] | None = None,
                    full_pool: str = "error") -> int:
    """Activate one new expert at `level` in every memory layer; returns its slot.

    `keys` gives each layer's router key (cosine router). A full pool follows `full_pool`:
    "error" raises `PoolFullError`, "merge" merges the two least-used experts first.
    """
    level_pools = pools(model, level)
    slot = level_pools[0].free_slot()
    if slot is None:
        if full_pool != "merge":
            raise PoolFullError(
                f"level {level} is full ({level_pools[0].capacity} experts); raise "
                f"memory.capacity or set memory.full_pool=merge")
        if level_pools[0].capacity < 2:
            raise PoolFullError(f"level {level}: a pool of one expert cannot merge")
        # Levels grow in lockstep across layers: pick the pair by usage summed over layers.
        usage = torch.stack([pool.usage for pool in level_pools]).sum(0)
        keep, drop = torch.argsort(usage, stable=True)[:2].tolist()
        for pool in level_pools:
            pool.merge(keep, drop)
        slot = drop
    for i, pool in enumerate(level_pools):
        pool.activate(slot, None if keys is None else keys[i])
    return slot


def prune_level(model: nn.Module, level: int, keep: tuple[int, ...] = ()) -> list[int]:
    """Reset (re-initialize and mask) the experts of `level`, except the slots in `keep`.

    Level 1's fast expert comes back active and fresh: the fast level is always there to learn.
    Returns the pruned slots.
    """
    pruned = [e for e in active_experts(model, level) if e not in keep]
    for pool in pools(model, level):
        for e in pruned:
            pool.reset_expert(e)
        if level == 1 and not pool.active.any():
            pool.activate(0)
    return pruned


def reset_level(model: nn.Module, level: int) -> None:
    """The `reset` transition: return every expert of `level` to its initial state."""
    for pool in pools(model, level):
        was_active = pool.active.clone()
        for e in range(pool.capacity):
            pool.reset_expert(e)
        pool.active.copy_(was_active)


def expert_parameters(model: nn.Module, level: int, expert: int | None = None,
                      router: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the experts of `level` (one slot, or all active ones)."""
    for name, memory in _named_memories(model):
        pool = memory.levels[level - 1]
        slots = [expert] if expert is not None else pool.active.nonzero().flatten().tolist()
        for e in slots:
            prefix = f"{name}.levels.{level - 1}"
            yield f"{prefix}.A.{e}", pool.A[e]
            yield f"{prefix}.B.{e}", pool.B[e]
            if router and pool.router_kind == "linear":
                yield f"{prefix}.router.{e}", pool.router[e]


def freeze_memory(model: nn.Module) -> None:
    for memory in memories(model):
        for p in memory.parameters():
            p.requires_grad_(False)


def set_trainable(model: nn.Module, level: int, expert: int | None = None,
                  trainable: bool = True) -> list[nn.Parameter]:
    """Unfreeze (or freeze) the active experts of `level` (or one slot); returns them."""
    params = [p for _, p in expert_parameters(model, level, expert)]
    for p in params:
        p.requires_grad_(trainable)
    return params


def trainable_memory(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def set_random_injection(model: nn.Module, on: bool) -> None:
    """The tensor-valued dream switch of every memory router (and MoE backbone router)."""
    for module in model.modules():
        if isinstance(module, ExpertPool) or hasattr(module, "_sleep_inject"):
            buf = module.inject if isinstance(module, ExpertPool) else module._sleep_inject
            buf.fill_(on)


@contextlib.contextmanager
def random_injection(model: nn.Module) -> Iterator[None]:
    set_random_injection(model, True)
    try:
        yield
    finally:
        set_random_injection(model, False)


@contextlib.contextmanager
def memory_off(model: nn.Module, levels: tuple[int, ...] | None = None) -> Iterator[None]:
    """The backbone alone inside this block: every expert masked, restored after. With
    `levels` (1-based), only those levels' experts (and so their gate classes)."""
    saved = [(pool, pool.active.clone()) for m in memories(model) for pool in m.levels
             if levels is None or pool.level in levels]
    for pool, _ in saved:
        pool.active.zero_()
    try:
        yield
    finally:
        for pool, active in saved:
            pool.active.copy_(active)


@contextlib.contextmanager
def continued_prefix(model: nn.Module, rows: torch.Tensor, prefill_rows: int) -> Iterator[None]:
    """Calls inside continue the running prefix means that sequence routing kept from the
    model's last call without gradients (a prefill of `prefill_rows` prompts), whatever their
    length: row i of a call continues row `rows[i]` of the prefill. So continuations run on a
    copy of the prompts' KV cache route as the whole sequences do in one teacher-forced pass.
    Every call inside starts from the prefill's state again; the state is given back as it was
    after the block. Without sequence routing nothing changes."""
    saved = {pool: pool._seq_state for pool in model.modules() if isinstance(pool, ExpertPool)}
    index = rows.long()

    def start(pool: ExpertPool, state) -> None:  # a pool the prefill did not route keeps None
        pool._seq_state = (None if state is None or len(state[0]) != prefill_rows
                           else (state[0][index], state[1][index]))

    def rewind(module, args) -> None:
        for pool, state in saved.items():
            start(pool, state)

    hook = model.register_forward_pre_hook(rewind)
    for pool in saved:
        pool.continues_prefix = True
    try:
        yield
    finally:
        hook.remove()
        for pool, state in saved.items():
            pool._seq_state, pool.continues_prefix = state, False


@contextlib.contextmanager
def whole_prompt_routing(model: nn.Module) -> Iterator[None]:
    """Sequence routing without gradients, inside this block: every token of a call that starts
    a sequence (a prompt's prefill) routes as the prompt's last token, on the mean of the whole
    prompt, which is known before any token is generated; the tokens after it continue the
    running mean as before. Causal prefix means route a prompt's first tokens on a few words
    of its form alone, and under the level gate what they add there reaches every later
    position through attention. `memory.prompt_routing` turns it on at inference
    (`inference_routing`); the HF path only, not the vLLM plugin."""
    with attributes_set([pool for m in memories(model) for pool in m.levels], "whole_prompt", True):
        yield


@contextlib.contextmanager
def attributes_set(objects: list, name: str, value) -> Iterator[None]:
    """Attribute `name` of every object set to `value` inside this block, restored after."""
    saved = [(obj, getattr(obj, name)) for obj in objects]
    for obj, _ in saved:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, was in saved:
            setattr(obj, name, was)


def inference_routing(model: nn.Module) -> contextlib.AbstractContextManager:
    """How the memory routes when the model answers (scoring, generation): whole prompts with
    `memory.prompt_routing`, else as everywhere else."""
    asks = any(pool.prompt_routing for m in memories(model) for pool in m.levels)
    return whole_prompt_routing(model) if asks else contextlib.nullcontext()


def routes_whole_prompts(model: nn.Module) -> bool:
    """True where a prompt's prefill routes as a whole now (`whole_prompt_routing`, or
    `memory.prompt_routing`): a prompt must then be prefilled alone, without its completion."""
    return any(pool.whole_prompt or pool.prompt_routing for m in memories(model) for pool in m.levels)


@contextlib.contextmanager
def wake_inputs(model: nn.Module) -> Iterator[None]:
    """Inside this block the inputs are wake data, the fast level's current window by
    definition: the level gate stands aside and every level routes on its own."""
    mems = memories(model)
    for memory in mems:
        memory.wake = True
    try:
        yield
    finally:
        for memory in mems:
            memory.wake = False


def usage_snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Every pool's routed-mass counts, copied (`restore_usage` puts them back)."""
    return [pool.usage.clone() for m in memories(model) for pool in m.levels]


@torch.no_grad()
def restore_usage(model: nn.Module, snapshot: list[torch.Tensor]) -> None:
    for pool, usage in zip([pool for m in memories(model) for pool in m.levels], snapshot):
        pool.usage.copy_(usage)


@contextlib.contextmanager
def track_usage(model: nn.Module) -> Iterator[None]:
    """Count routed gate mass per expert (for the merge policy) inside this block."""
    level_pools = [p for m in memories(model) for p in m.levels]
    for pool in level_pools:
        pool.track_usage = True
    try:
        yield
    finally:
        for pool in level_pools:
            pool.track_usage = False


@contextlib.contextmanager
def capture_memory_inputs(model: nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record the hidden states (B, T, d) entering each layer's memory, keyed by layer index."""
    captured: dict[int, list[torch.Tensor]] = {}
    mems = memories(model)
    for memory in mems:
        captured[memory.layer] = memory._capture = []
    try:
        yield captured
    finally:
        for memory in mems:
            memory._capture = None


def _named_memories(model: nn.Module) -> list[tuple[str, LayerMemory]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LayerMemory)]
