"""Serving a run's model over an OpenAI-compatible HTTP API with Ray Serve, and teaching it while
it serves. One concern a module:

    app.py       the Serve deployment and its FastAPI routes (completions, chat, models, version,
                 and the /v1/sleep/learn routes when learning is on)
    requests.py  the checks every completion request passes (4xx naming the parameter)
    memory.py    finding the run's newest memory and swapping it in under traffic (MemoryGate)
    intake.py    the checks a learn request passes: its key, size, items, rate
    store.py     where a taught example is stored: SQLite in RUN_DIR/learn (LearnStore)
    loop.py      the learning loop: the SleepDriver waking on the store, sleeping, publishing

`sleep-ray serve RUN_DIR [--learn]` runs `main`; `start` deploys from Python. Names are imported
lazily, so `sleep_ray.serve.store` loads without Ray.
"""

from __future__ import annotations

import hmac  # noqa: F401 - the key checks' comparison (tests spy on sleep_ray.serve.hmac)
import importlib

_EXPORTS = {
    "app": ("APP_NAME", "DEFAULT_MODEL_NAME", "DEPLOYMENT_NAME", "SleepLLM",
            "build_app", "learn_config", "main", "start"),
    "loop": ("LEARNER_NAME", "LearningLoop", "SleepLearner"),
    "store": ("LearnStore", "TaughtItem", "key_id"),
    "intake": ("Intake", "check_learn_key", "learn_items"),
    "memory": ("MemoryGate", "newest_memory_source", "read_memory"),
    "requests": ("MAX_BODY_BYTES", "APIError", "ParsedRequest", "TextDeltas", "chat_prompt",
                 "chat_request", "chat_template_ids", "check_api_key", "check_body_size",
                 "check_messages", "check_model", "completion_request", "error_body",
                 "include_usage", "parse_body", "prompt_ids", "read_body", "sampling_options",
                 "too_large"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sleep_ray.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sleep_ray.serve.{_WHERE[name]}"), name)
