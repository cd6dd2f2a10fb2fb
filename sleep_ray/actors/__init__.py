"""The roles of a Ray run, as plain classes the driver wraps with `ray.remote(...)`.

- `learner.LearnerWorker`: the trainable state (wake, consolidation, dream learning), torch or
  DeepSpeed backend, one worker or a data-parallel group.
- `rollout.RolloutWorker`: sampling (teacher samples, dreams) on the HF or vLLM engine.
- `scorer.ScorerWorker`: dream importance and LoRA-copy rewards.
- `replica`: the published `ModelState` (memory + dreamer adapter) and the replicas that load it.
- `placement`: which actor asks for which resources, and the placement group.

Nothing is imported here: `import sleep_ray.actors.<module>` pulls only what that role needs.
"""
