"""Where each actor runs: the placement plan, its placement group, and per-actor memory estimates.

`placement_plan(cfg, total_cpus)` lists every actor with the CPUs and GPUs it asks Ray for; the
driver starts exactly this list, and `jobs/qwen3_8b_sleep.py --dry-run` prints it without
starting anything. On a GPU cluster all actors go into one placement group (one bundle per
actor, PACK: learner, rollouts and scorers as close as the cluster allows, so that memory syncs
stay on a node where they can); on CPU-only runs no placement group is made and the CPUs are
shared out so that every actor fits the cluster (a laptop with 2 cores still runs 4 actors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sleep_ray.config import SleepConfig

Role = Literal["learner", "rollout", "scorer"]
# Rollout and scorer workers hold nothing that is not re-sent with each call (the published
# state): Ray restarts them, and the driver's `WorkerPool` (actors/pool.py) re-publishes to a
# restarted worker and resends its lost call, so Ray itself retries no task. The learner holds the
# run's state: the driver starts a new learner group from the newest checkpoint instead.
RESTARTS = {"learner": 0, "rollout": 2, "scorer": 2}
GIB = 2**30


@dataclass(frozen=True)
class ActorSpec:
    role: Role
    rank: int  # index within the role
    num_cpus: float
    num_gpus: float

    @property
    def name(self) -> str:
        return f"{self.role}-{self.rank}"


def placement_plan(cfg: SleepConfig, total_cpus: float | None = None) -> list[ActorSpec]:
    """Every actor of the run: the learner group, the rollout pool, the scorer pool.

    `total_cpus` (the cluster's) caps each actor's CPU request at an equal share, 1 at most;
    None asks 1 CPU per actor.
    """
    roles: list[tuple[Role, int, float]] = [
        ("learner", cfg.learner.num_workers, cfg.learner.num_gpus),
        ("rollout", cfg.rollout.num_workers, cfg.rollout.num_gpus),
        ("scorer", cfg.scorer.num_workers, cfg.scorer.num_gpus),
    ]
    count = sum(n for _, n, _ in roles)
    cpus = 1.0 if total_cpus is None else max(0.01, min(1.0, int(100 * total_cpus / count) / 100))
    return [ActorSpec(role, rank, cpus, gpus) for role, n, gpus in roles for rank in range(n)]


def bundles(plan: list[ActorSpec]) -> list[dict[str, float]]:
    return [{"CPU": s.num_cpus, **({"GPU": s.num_gpus} if s.num_gpus else {})} for s in plan]


def make_placement_group(plan: list[ActorSpec]):
    """A PACK placement group with one bundle per actor, or None when no actor uses a GPU."""
    if not any(s.num_gpus for s in plan):
        return None
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(bundles(plan), strategy="PACK", name="sleep_ray")
    ray.get(pg.ready())
    return pg


def actor_options(spec: ActorSpec, index: int, pg=None) -> dict:
    """Keyword arguments of `ray.remote(...)` for `spec`, bundle `index` of `pg` when given."""
    opts = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
            "max_restarts": RESTARTS[spec.role], "max_task_retries": 0}
    if pg is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index)
    return opts


# ---------------------------------------------------------------------- memory estimates


def memory_estimates(cfg: SleepConfig, footprint, gpu_bytes: float = 80 * GIB) -> dict[Role, tuple[int, str]]:
    """(bytes, what they are) per actor of each role, from a `model.footprint.Footprint`.

    Weights and optimizer states only: activations (batch x sequence dependent) are not counted.
    """
    fp = footprint
    # Trainable at wake: level 1's experts at every memory layer (plus their router entries).
    fast = fp.expert_bytes * cfg.memory.capacity[0] * fp.memory_layers
    # AdamW moments (2x), gradients and the Eq. 2 pending sum: 4 more copies of the fast level.
    learner = fp.model_bytes + 4 * fast
    rollout = max(fp.model_bytes, int(cfg.rollout.gpu_memory_utilization * gpu_bytes)) \
        if cfg.rollout.backend == "vllm" else fp.model_bytes
    scorer = 2 * fp.model_bytes  # evaluate_on_lora_copies deep-copies the model (LoRA: ~MBs)
    return {
        "learner": (learner, "backbone + memory, + AdamW moments, gradients, Eq. 2 sum of level 1"),
        "rollout": (rollout, (f"vLLM: weights + KV cache, {cfg.rollout.gpu_memory_utilization:g} of an {gpu_bytes / GIB:g} GiB GPU"
                              if cfg.rollout.backend == "vllm" else "backbone + memory + dreamer")),
        "scorer": (scorer, "replica + its deep copy carrying each dream's LoRA"),
    }


def format_plan(cfg: SleepConfig, plan: list[ActorSpec], footprint=None) -> str:
    """The table `--dry-run` prints: one line per actor, then totals."""
    est = memory_estimates(cfg, footprint) if footprint is not None else {}
    lines = [f"{'actor':<10} {'GPUs':>5} {'CPUs':>5} {'est. memory':>12}  what"]
    for s in plan:
        nbytes, what = est.get(s.role, (0, ""))
        mem = f"{nbytes / GIB:.1f} GiB" if est else "-"
        lines.append(f"{s.name:<10} {s.num_gpus:>5g} {s.num_cpus:>5g} {mem:>12}  {what}")
    gpus = sum(s.num_gpus for s in plan)
    group = f"one placement group of {len(plan)} bundles (PACK)" if gpus else "no placement group (CPU only)"
    lines.append(f"total: {len(plan)} actors, {gpus:g} GPUs, {sum(s.num_cpus for s in plan):g} CPUs; {group}")
    if footprint is not None:
        lines.append(f"model {footprint.model_bytes / GIB:.2f} GiB; memory state per sync "
                     f"{footprint.memory_state_bytes / 2**20:.1f} MiB "
                     f"({100 * footprint.state_over_model:.2f}% of the model); one expert "
                     f"{footprint.expert_bytes / 2**10:.0f} KiB per layer x {footprint.memory_layers} layers")
    return "\n".join(lines)
