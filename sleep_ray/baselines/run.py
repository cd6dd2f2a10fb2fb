"""The continual-learning baselines, in the same harness as Sleep.

Same model (`build_sleep_model`), same stream order, same batches (`task_batches`), same
optimizer kind and learning rate as Sleep's fast level, same evaluation after each task. The
methods differ only in what they train and in the hooks of `trainer.Method`:

    naive_memory   the memory's level-1 fast expert, fine-tuned on every task in turn, never
                   consolidated: Sleep's wake without sleep (it forgets)
    naive_lora     a plain peft LoRA on the backbone (memory frozen, its fast expert stays zero),
                   rank matched to the fast expert's parameter count
    ewc            the fast expert with online EWC (ewc.py)
    replay         the fast expert; each batch mixed with as many examples from a reservoir
                   buffer of everything seen so far (replay.py)
    joint          the fast expert trained once on the shuffled union of all tasks: the upper
                   bound. It has one evaluation, after all tasks; R is T copies of that row,
                   so ACC is its final mean, BWT and forgetting are 0, and retention against
                   `single` measures what sharing one expert among all tasks costs.
    single         each task learned alone from the initial model: row j of R is the model
                   that learned only task j, scored on every task; its diagonal is the reference
                   `single[j]` (`single_scores`) for `summarize(R, single=...)`. The summary of
                   this R alone is not a continual-learning result.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from peft import LoraConfig
from torch import nn

from sleep_ray.algo.cms import make_optimizer
from sleep_ray.baselines import ewc
from sleep_ray.baselines.config import BaselineConfig
from sleep_ray.baselines.replay import ReservoirBuffer
from sleep_ray.baselines.trainer import Method, completion_nll, evaluate, learn_task
from sleep_ray.config import SleepConfig
from sleep_ray.model import memory as M
from sleep_ray.sleep.loop import RunRecord, task_batches
from sleep_ray.sleep.pretrain import build_sleep_model
from sleep_ray.types import Example, Stream, Task

METHODS = ("naive_memory", "naive_lora", "ewc", "replay", "joint", "single")
Builder = Callable[[SleepConfig], tuple]  # cfg -> (model with memory, tokenizer)


def run_baseline(method: str, cfg: SleepConfig, stream: Stream, bcfg: BaselineConfig, *,
                 build: Builder = build_sleep_model) -> RunRecord:
    """Run one baseline over `stream`; R has one row per task (see the module docstring).

    `build` makes the model: the pretrained tiny base by default, `build_model` in tests.
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {METHODS}")
    torch.manual_seed(cfg.run.seed)
    model, tok = build(cfg)
    M.freeze_memory(model)
    record = RunRecord()
    budget = count(dict(M.expert_parameters(model, 1)))  # Sleep's wake budget
    if method == "naive_memory":
        run = Method(method, fast_expert(model))
    elif method == "naive_lora":
        run = Method(method, add_matched_lora(model, bcfg, budget, cfg.run.seed))
    elif method == "ewc":
        run = ewc_method(model, tok, cfg, bcfg)
    elif method == "replay":
        run = replay_method(model, cfg, bcfg)
    elif method == "joint":
        run = Method(method, fast_expert(model))
    else:  # single
        run = Method(method, fast_expert(model))
    record.metrics.append({"baseline/method": method, "baseline/memory_budget": budget,
                           "baseline/trainable_params": count(run.params)})
    if method == "joint":
        learn_jointly(model, tok, stream, run, cfg, bcfg, record)
    elif method == "single":
        learn_each_alone(model, tok, stream, run, cfg, bcfg, record)
    else:
        learn_in_sequence(model, tok, stream, run, cfg, bcfg, record)
    return record


# ------------------------------------------------------------------------ how tasks are visited


def _optimizer(cfg: SleepConfig, bcfg: BaselineConfig, params: dict) -> torch.optim.Optimizer:
    """Sleep's fast-level optimizer (kind and learning rate), unless `bcfg.lr` says otherwise."""
    lr = bcfg.lr if bcfg.lr is not None else cfg.schedule.learning_rates[0]
    return make_optimizer(cfg.schedule.optimizer, lr)(list(params.values()))


def learn_in_sequence(model, tok, stream: Stream, method: Method, cfg: SleepConfig,
                      bcfg: BaselineConfig, record: RunRecord) -> None:
    """Tasks in stream order, one optimizer throughout; a row of R after each task."""
    optimizer = _optimizer(cfg, bcfg, method.params)
    for task in stream.tasks:
        learn_task(model, tok, task, optimizer, method, cfg, record)
        record.R.append(evaluate(model, tok, stream.tasks, cfg, record))


def learn_jointly(model, tok, stream: Stream, method: Method, cfg: SleepConfig,
                  bcfg: BaselineConfig, record: RunRecord) -> None:
    """The union of all train splits as one task (shuffled by `task_batches`), scored once."""
    union = Task("joint", tuple(itertools.chain.from_iterable(t.train for t in stream.tasks)),
                 (), ())
    learn_task(model, tok, union, _optimizer(cfg, bcfg, method.params), method, cfg, record)
    row = evaluate(model, tok, stream.tasks, cfg, record)
    record.R.extend(list(row) for _ in stream.tasks)  # T identical rows: see module docstring


def learn_each_alone(model, tok, stream: Stream, method: Method, cfg: SleepConfig,
                     bcfg: BaselineConfig, record: RunRecord) -> None:
    """Task j from the initial parameters and a fresh optimizer; row j of R scores that model.

    Only `method.params` ever change (the backbone and the rest of the memory are frozen), so
    restoring them restores the initial model.
    """
    initial = {n: p.detach().clone() for n, p in method.params.items()}
    for task in stream.tasks:
        with torch.no_grad():
            for n, p in method.params.items():
                p.copy_(initial[n])
        learn_task(model, tok, task, _optimizer(cfg, bcfg, method.params), method, cfg, record)
        record.R.append(evaluate(model, tok, stream.tasks, cfg, record))


def single_scores(record: RunRecord) -> list[float]:
    """single[j] = R[j][j] of a `single` run: task j's score when learned alone."""
    return [row[j] for j, row in enumerate(record.R)]


# ------------------------------------------------------------------------ trainable parameters


def fast_expert(model: nn.Module) -> dict[str, nn.Parameter]:
    """The level-1 fast expert of every memory layer, made trainable: Sleep's wake budget."""
    M.freeze_memory(model)
    M.set_trainable(model, 1)
    return dict(M.expert_parameters(model, 1))


def count(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())


def lora_cost_per_rank(model: nn.Module, targets: tuple[str, ...]) -> int:
    """Trainable LoRA parameters per unit of rank: sum of (in + out) over the targeted Linears.

    Targets match as peft matches a list of names: the module name or its last components.
    """
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += module.in_features + module.out_features
    if total == 0:
        raise ValueError(f"baseline.lora_targets={targets!r}: no nn.Linear of the model matches")
    return total


def matched_lora_rank(budget: int, cost_per_rank: int) -> int:
    """The rank r >= 1 whose r * cost_per_rank is closest to `budget` (ties: the smaller r)."""
    low = max(1, budget // cost_per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * cost_per_rank - budget), r))


def add_matched_lora(model: nn.Module, bcfg: BaselineConfig, budget: int,
                     seed: int) -> dict[str, nn.Parameter]:
    """A plain peft LoRA on the backbone, with the memory frozen (its fast expert's B stays 0,
    so the memory adds exactly nothing); returns the LoRA parameters."""
    rank = bcfg.lora_rank or matched_lora_rank(budget, lora_cost_per_rank(model, bcfg.lora_targets))
    torch.manual_seed(seed)  # LoRA A's init draws from the global generator
    model.add_adapter(LoraConfig(r=rank, lora_alpha=bcfg.lora_alpha or rank, lora_dropout=0.0,
                                 target_modules=list(bcfg.lora_targets)))
    M.freeze_memory(model)
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    return params


# ------------------------------------------------------------------------ method hooks


def ewc_method(model, tok, cfg: SleepConfig, bcfg: BaselineConfig) -> Method:
    """The fast expert with the online EWC penalty; Fisher and anchors renewed after each task."""
    params = fast_expert(model)
    state: dict[str, dict | None] = {"fisher": None, "anchors": None}

    def penalty() -> tuple[torch.Tensor, dict]:
        if state["fisher"] is None:  # first task: nothing to protect yet
            return torch.zeros((), device=next(iter(params.values())).device), {}
        return ewc.ewc_penalty(params, state["anchors"], state["fisher"], bcfg.ewc_lambda)

    def after_task(task: Task) -> dict:
        task_fisher = fisher_of_task(model, tok, task, params, cfg, bcfg.fisher_batches)
        state["fisher"] = ewc.online_fisher_update(state["fisher"], task_fisher, bcfg.ewc_gamma)
        state["anchors"] = {n: p.detach().clone() for n, p in params.items()}
        return {"ewc/fisher_sum": float(sum(f.sum() for f in state["fisher"].values()))}

    return Method("ewc", params, penalty=penalty, after_task=after_task)


def fisher_of_task(model, tok, task: Task, params: dict[str, nn.Parameter], cfg: SleepConfig,
                   num_batches: int) -> dict[str, torch.Tensor]:
    """Mean squared per-batch NLL gradient over the first `num_batches` batches of `task`."""
    names, tensors = list(params), list(params.values())
    grads = []
    batches = task_batches(task, cfg.data.batch_size, cfg.run.seed, epoch=0)
    for batch in itertools.islice(batches, num_batches):
        nll = completion_nll(model, tok, batch, cfg.data.max_length)
        grads.append(dict(zip(names, torch.autograd.grad(nll, tensors))))
    return ewc.squared_gradient_mean(grads)


def replay_method(model, cfg: SleepConfig, bcfg: BaselineConfig) -> Method:
    """The fast expert; each batch plus an equal number of examples replayed from the buffer.

    The replay draw comes before the batch joins the buffer (Chaudhry et al. 2019's ER), and a
    batch joins only on its first epoch, so the buffer samples distinct wake examples.
    """
    buffer: ReservoirBuffer[Example] = ReservoirBuffer(bcfg.replay_capacity, cfg.run.seed)

    def mix(batch: list[Example], epoch: int) -> list[Example]:
        replayed = buffer.sample(len(batch))
        if epoch == 0:
            buffer.extend(batch)
        return list(batch) + replayed

    return Method("replay", fast_expert(model), mix=mix)
