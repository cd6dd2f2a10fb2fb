"""The one training loop every baseline shares: the same batches and evaluation as Sleep.

    for each task, for each epoch, for each batch (`task_batches`, as Sleep's wake sees them):
        examples = mix(batch)                       replay adds buffer examples; others: as is
        loss     = completion NLL + penalty()       EWC adds its penalty; others: nothing
        optimizer step on the method's parameters
    after_task(task)                                EWC updates its Fisher and anchors
    after each task: score_stream(..., "test")      a row of the accuracy matrix R

A baseline is a `Method`: its trainable parameters and up to three optional hooks. Nothing else
differs between methods, so a difference in R is the method's, not the harness's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sleep_ray.config import SleepConfig
from sleep_ray.data.collate import collate_examples
from sleep_ray.eval.evaluate import score_stream
from sleep_ray.sleep.loop import RunRecord, task_batches
from sleep_ray.types import Example, Task


@dataclass
class Method:
    """What distinguishes one baseline inside the shared loop."""

    name: str
    params: dict[str, nn.Parameter]  # the only parameters the optimizer steps
    # () -> (extra loss, stats), added to the NLL of every step (EWC's penalty).
    penalty: Callable[[], tuple[torch.Tensor, dict]] | None = None
    # (batch, epoch) -> the examples trained on at this step (replay mixes its buffer in).
    mix: Callable[[list[Example], int], list[Example]] | None = None
    # task -> stats, after the task's last step (EWC's Fisher and anchors).
    after_task: Callable[[Task], dict] | None = None


def completion_nll(model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   examples: Sequence[Example], max_length: int) -> torch.Tensor:
    """Token-mean NLL (nats) of the completions given the prompts: Sleep's wake loss."""
    batch = collate_examples(tok, examples, max_length)
    device = next(model.parameters()).device
    return model(input_ids=batch.input_ids.to(device),
                 attention_mask=batch.attention_mask.to(device),
                 labels=batch.labels.to(device)).loss


def train_step(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example],
               optimizer: torch.optim.Optimizer, method: Method, max_length: int) -> dict:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    nll = completion_nll(model, tok, examples, max_length)
    loss, stats = nll, {}
    if method.penalty is not None:
        extra, stats = method.penalty()
        loss = loss + extra
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"train/nll": nll.item(), "train/loss": loss.item(),
            "train/examples": len(examples), **stats}


def learn_task(model: PreTrainedModel, tok: PreTrainedTokenizerBase, task: Task,
               optimizer: torch.optim.Optimizer, method: Method, cfg: SleepConfig,
               record: RunRecord) -> None:
    """Every epoch of `task`'s train split, in Sleep's batch order, then `after_task`."""
    for epoch in range(cfg.run.epochs_per_task):
        for batch in task_batches(task, cfg.data.batch_size, cfg.run.seed, epoch):
            examples = method.mix(batch, epoch) if method.mix is not None else batch
            with record.timed("train"):
                stats = train_step(model, tok, examples, optimizer, method, cfg.data.max_length)
            record.metrics.append({"step": _steps_done(record) + 1, "task": task.name, **stats})
    if method.after_task is not None:
        with record.timed("after_task"):
            stats = method.after_task(task)
        record.metrics.append({"step": _steps_done(record), "task": task.name, **stats})


def _steps_done(record: RunRecord) -> int:
    """Optimizer steps logged so far. A row's step counts the steps done with it, as Sleep's
    wake rows do: the first update is step 1, and a task's `after_task` row has its last step."""
    return sum("train/loss" in row for row in record.metrics)


def evaluate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, tasks: Sequence[Task],
             cfg: SleepConfig, record: RunRecord) -> list[float]:
    """One row of R: every task's test score, exactly as the Sleep run scores it."""
    with record.timed("evaluate"):
        return score_stream(model, tok, tasks, "test", cfg.data.max_length,
                            cfg.data.max_new_tokens)
