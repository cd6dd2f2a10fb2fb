"""Can the tiny frozen backbone learn a task at all through a small set of parameters?

    python benchmarks/learnability.py --config benchmarks/configs/clinc150.yaml [--epochs 6]

Trains ONE task (the stream's first) from the same pretrained tiny base with three parameter
sets, side by side, and prints test score per epoch:
  memory      the memory's level-1 fast expert (what Sleep's wake trains)
  lora        a peft LoRA of rank memory.rank on every MLP's down_proj (a standard adapter)
  full        every backbone weight (no longer a frozen-backbone method: the ceiling)
If memory and lora stay near chance while full learns, the limit is the frozen tiny backbone,
not Sleep's consolidation: a continual-learning comparison needs a task the adapters can learn.
torch, peft and the model are imported after the arguments are read (`--help` answers at once).
"""

from __future__ import annotations

import argparse
import sys
import time


def trainable(kind: str, model, rank: int) -> tuple[list, float]:
    """The parameters `kind` trains and its learning rate."""
    from peft import LoraConfig

    from sleep_ray.model import memory as M

    if kind == "memory":
        return M.set_trainable(model, 1), 1e-2
    if kind == "lora":
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["down_proj"],
                                     lora_dropout=0.0), adapter_name="probe")
        params = [p for n, p in model.named_parameters() if ".probe." in n]
        for p in params:
            p.requires_grad_(True)
        return params, 1e-2
    params = [p for n, p in model.named_parameters() if ".memory." not in n]
    for p in params:
        p.requires_grad_(True)
    return params, 1e-3


def run(kind: str, cfg, task, epochs: int) -> list[tuple[int, float, float, float]]:
    import torch

    from sleep_ray.data.collate import collate_examples
    from sleep_ray.eval.evaluate import score_examples
    from sleep_ray.sleep.loop import task_batches
    from sleep_ray.sleep.pretrain import build_sleep_model

    torch.manual_seed(cfg.run.seed)
    model, tok = build_sleep_model(cfg)
    params, lr = trainable(kind, model, cfg.memory.rank)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rows, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for examples in task_batches(task, cfg.data.batch_size, cfg.run.seed, epoch):
            b = collate_examples(tok, examples, cfg.data.max_length)
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = score_examples(model, tok, task.test, task.metric, cfg.data.max_length,
                               cfg.data.max_new_tokens)
        rows.append((epoch + 1, loss.item(), score, time.perf_counter() - t0))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="benchmarks/configs/clinc150.yaml", help="YAML config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override one field (repeatable)")
    ap.add_argument("--epochs", type=int, default=6, help="epochs over the task (default: 6)")
    ap.add_argument("--kinds", default="memory,lora,full", help="comma list of memory, lora, full")
    from sleep_ray.cli import add_logging_args, setup_logging

    add_logging_args(ap)
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    from sleep_ray.config import load_config
    from sleep_ray.data import stream_from_config
    from sleep_ray.sleep.pretrain import build_sleep_model

    cfg = load_config(args.config, args.overrides)
    task = stream_from_config(cfg.data, cfg.run.seed).tasks[0]
    print(f"task {task.name}: {len(task.train)} train, {len(task.test)} test, metric {task.metric}")
    print("| parameters | trainable | epoch | last batch loss | test score | seconds |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        model, _ = build_sleep_model(cfg)
        n = sum(p.numel() for p in trainable(kind, model, cfg.memory.rank)[0])
        for epoch, loss, score, seconds in run(kind, cfg, task, args.epochs):
            print(f"| {kind} | {n} | {epoch} | {loss:.3f} | {score:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    from sleep_ray.cli import guarded

    sys.exit(guarded(main))
