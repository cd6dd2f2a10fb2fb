"""The CMS update rule (METHOD.md Eq. 2): each level sums its update terms over its chunk.

    theta_l <- theta_l - sum_{t in last C(l) steps} eta_t(l) f(theta_l; x_t)   if i = 0 mod C(l)

f is the update term of any torch optimizer. At every wake step, `LevelOptimizer.accumulate`
asks the level's own optimizer for its update term on the current gradient (the optimizer's
state, e.g. Adam's moments, advances every step as usual), adds it to the level's pending sum,
and leaves the parameters where they were; `apply` adds the sum at the chunk's end. Gradients
between a level's updates are never dropped. With plain SGD this is exactly theta -= lr * sum(g).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def make_optimizer(kind: str, lr: float) -> OptimizerFactory:
    """A factory for a level's optimizer ("sgd" or "adamw", no weight decay on memory)."""
    if kind == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr)
    if kind == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {kind!r}")


class LevelOptimizer:
    """One CMS level's optimizer state and pending (accumulated, not yet applied) update."""

    def __init__(self, level: int, chunk_size: int, factory: OptimizerFactory):
        self.level, self.chunk_size, self.factory = level, chunk_size, factory
        self.params: dict[str, nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.steps_accumulated = 0

    def set_params(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        """(Re)bind the level's parameters, e.g. after a consolidation added an expert.

        A parameter bound before under the same name keeps its pending sum and its optimizer
        state (Eq. 2: accumulated update terms are never dropped); new ones start fresh.
        """
        named = dict(named)
        if named.keys() == self.params.keys() and all(named[k] is self.params[k] for k in named):
            return
        old_params, old_opt = self.params, self.optimizer
        self.params = named
        self.optimizer = self.factory(list(named.values())) if named else None
        self.pending = {k: v for k, v in self.pending.items() if k in named}
        if old_opt is not None and self.optimizer is not None:
            for name, p in named.items():
                old = old_params.get(name)
                if old is not None and old in old_opt.state:
                    self.optimizer.state[p] = old_opt.state[old]
        if not self.pending:
            self.steps_accumulated = 0

    @torch.no_grad()
    def accumulate(self) -> None:
        """Turn the current gradients into this step's update term and add it to the sum."""
        if self.optimizer is None:
            return
        before = {n: p.detach().clone() for n, p in self.params.items() if p.grad is not None}
        self.optimizer.step()  # moves the parameters by this step's update term ...
        for name, old in before.items():
            p = self.params[name]
            delta = p.detach() - old
            p.copy_(old)  # ... which we take back: theta stays fixed within the chunk
            self.pending[name] = self.pending.get(name, 0) + delta
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_accumulated += 1

    @torch.no_grad()
    def apply(self) -> int:
        """Apply the summed update of the chunk; returns how many steps it summed."""
        for name, delta in self.pending.items():
            self.params[name].add_(delta)
        n, self.pending, self.steps_accumulated = self.steps_accumulated, {}, 0
        return n

    def reset(self) -> None:
        """The `reset` transition: drop the pending sum and the optimizer state."""
        params, self.params, self.pending, self.optimizer = self.params, {}, {}, None
        self.set_params(params.items())

    def state_dict(self) -> dict:
        return {"pending": {k: v.clone() for k, v in self.pending.items()},
                "steps_accumulated": self.steps_accumulated,
                "names": list(self.params),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        if list(self.params) != state["names"]:
            raise ValueError(f"level {self.level}: optimizer state for parameters "
                             f"{state['names'][:2]}... does not fit {list(self.params)[:2]}...")
        self.pending = {k: v.clone() for k, v in state["pending"].items()}
        self.steps_accumulated = state["steps_accumulated"]
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
