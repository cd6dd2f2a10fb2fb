from pathlib import Path

import pytest

from sleep_ray.config import (ConfigError, SleepConfig, apply_overrides, config_from_dict,
                              config_to_dict, load_config, save_config)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, SleepConfig)
    assert cfg.memory.num_levels == cfg.schedule.num_levels


SHIPPED = sorted(str(p.relative_to(ROOT)) for pattern in ("jobs/configs/*.yaml", "benchmarks/configs/*.yaml")
                 for p in ROOT.glob(pattern))


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(ROOT / path)
    assert isinstance(cfg, SleepConfig)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.startswith("benchmarks/")])
def test_benchmark_windows_do_not_mark_task_boundaries(path):
    # METHOD.md section 1: the learner is never told where a task ends. A window that divides a
    # task's wake steps would consolidate exactly at every task boundary.
    cfg = load_config(ROOT / path)
    if cfg.data.stream == "jsonl":
        return  # a file's task sizes are not in the config
    per_task = -(-cfg.data.train_per_task // cfg.data.batch_size) * cfg.run.epochs_per_task
    for level in range(1, cfg.schedule.num_levels):
        w = cfg.schedule.window(level)
        assert w == 0 or (per_task % w and w % per_task), (level, w, per_task)


# real.yaml's shift check (schedule.shift_*), where a consolidation's start is fitted and on how
# many contexts each class of the gate is fitted (memory.fit_tokens, memory.router_contexts), and
# how the model routes a prompt when it answers (memory.prompt_routing): the configs measured
# before them stay without them.
SHIFT = {"shift_ratio", "shift_margin", "shift_history", "fit_tokens", "router_contexts",
         "prompt_routing"}


def test_the_demo_runs_the_measured_method():
    # `make demo` (jobs/configs/smollm2_facts.yaml) is real.yaml's memory and method on a smaller
    # stream: only the windows (sized to its 72-step tasks), the held-out slice, the engine and
    # the probes differ.
    demo = config_to_dict(load_config(ROOT / "jobs/configs/smollm2_facts.yaml"))
    real = config_to_dict(load_config(ROOT / "benchmarks/configs/real.yaml"))
    for section in ("model", "memory", "seeding", "dreaming", "schedule"):
        differ = {k for k in demo[section] if demo[section][k] != real[section][k]}
        assert differ <= {"windows", "heldout_size"}, (section, differ)
    assert demo["schedule"]["windows"] == [64, 128, 0] and 72 % 64 and 144 % 128  # 72-step tasks


def test_the_real_ablation_base_is_the_measured_method_with_dreams():
    # benchmarks/configs/real_ablation.yaml: real.yaml's memory and method, dreaming on, windows
    # sized to its 56-step facts tasks (boundary at 56, 112) and 8 held-out questions; on the
    # clock alone, as its table was measured.
    base = config_to_dict(load_config(ROOT / "benchmarks/configs/real_ablation.yaml"))
    real = config_to_dict(load_config(ROOT / "benchmarks/configs/real.yaml"))
    for section in ("model", "memory", "seeding", "dreaming", "schedule", "data", "run"):
        differ = {k for k in base[section] if base[section][k] != real[section][k]}
        assert differ <= {"windows", "heldout_size", "enabled", *SHIFT}, (section, differ)
    assert base["dreaming"]["enabled"] and not real["dreaming"]["enabled"]
    assert base["schedule"]["windows"] == [48, 96, 0] and 56 % 48 and 112 % 96


def test_languages_into_english_runs_the_measured_method():
    # benchmarks/configs/real_languages.yaml: real.yaml's memory and method on three languages
    # into English; 64-step tasks (128 sentences / 8 x 4 epochs), no consolidation on a boundary.
    cfg = load_config(ROOT / "benchmarks/configs/real_languages.yaml")
    langs, real = config_to_dict(cfg), config_to_dict(load_config(ROOT / "benchmarks/configs/real.yaml"))
    for section in ("model", "memory", "seeding", "dreaming", "schedule", "run"):
        differ = {k for k in langs[section] if langs[section][k] != real[section][k]}
        assert differ <= {"windows", "epochs_per_task"}, (section, differ)
    task = -(-cfg.data.train_per_task // cfg.data.batch_size) * cfg.run.epochs_per_task
    assert cfg.data.target_language == "english" and task == 64
    for w in cfg.schedule.windows[:-1]:
        assert all(step % task for step in range(w, task * cfg.data.num_tasks + 1, w)), w


def test_clinc150_on_the_real_backbone_runs_the_measured_method():
    # benchmarks/configs/real_clinc150.yaml: real.yaml's memory and method on CLINC150's domains,
    # class-incremental; 76-step tasks (150 utterances / 8 x 4 epochs), no consolidation on a
    # boundary.
    cfg = load_config(ROOT / "benchmarks/configs/real_clinc150.yaml")
    clinc, real = config_to_dict(cfg), config_to_dict(load_config(ROOT / "benchmarks/configs/real.yaml"))
    for section in ("model", "memory", "seeding", "dreaming", "schedule", "run"):
        differ = {k for k in clinc[section] if clinc[section][k] != real[section][k]}
        assert differ <= {"epochs_per_task"}, (section, differ)
    task = -(-cfg.data.train_per_task // cfg.data.batch_size) * cfg.run.epochs_per_task
    assert cfg.data.stream == "clinc150" and task == 76
    for w in cfg.schedule.windows[:-1]:
        assert all(step % task for step in range(w, task * cfg.data.num_tasks + 1, w)), w


def test_shipped_yamls_exist():
    assert list(ROOT.glob("jobs/configs/*.yaml")), "jobs/configs/ must ship at least one config"


def test_round_trip(tmp_path):
    cfg = load_config(None, ["memory.rank=4", "seeding.lam=0.25"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["memory.rank=8", "memory.capacity=[1, 4, 4]",
                             "dreaming.enabled=false", "model.tokenizer_path=null"])
    assert cfg.memory.rank == 8 and cfg.memory.capacity == (1, 4, 4)
    assert cfg.dreaming.enabled is False and cfg.model.tokenizer_path is None


@pytest.mark.parametrize("overrides, field, value", [
    (["memory.rnak=8"], "memory.rnak", "8"),
    (["nosuch.x=1"], "nosuch", ""),
    (["memory.rank=eight"], "memory.rank", "eight"),
    (["memory.rank=2.5"], "memory.rank", "2.5"),
    (["seeding.lam=1.5"], "seeding.lam", "1.5"),
    (["run.engine=cluster"], "run.engine", "cluster"),
    (["schedule.chunk_sizes=[1, 4, 6]"], "schedule.chunk_sizes", "6"),
    (["memory.top_k=[1, 9, 1]"], "memory.top_k", "9"),
    (["memory.capacity=[1, 4]"], "memory.top_k", ""),
    (["dreaming.top_k=8", "dreaming.num_random=4"], "dreaming.top_k", "8"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "3"),
    (["run.probes=-1"], "run.probes", "-1"),
    (["memory.fit_tokens=source"], "memory.fit_tokens", "needs level_gate"),
    (["memory.fit_tokens=most"], "memory.fit_tokens", "most"),
])
def test_bad_values_name_the_field_and_value(overrides, field, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert field in message and value in message


def test_levels_must_agree_between_memory_and_schedule():
    with pytest.raises(ConfigError, match="schedule.chunk_sizes"):
        load_config(None, ["schedule.chunk_sizes=[1, 4]", "schedule.windows=[4, 0]",
                             "schedule.learning_rates=[0.1, 0.01]"])


def test_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory:\n  rank: -1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: memory.rank=-1"):
        load_config(bad)


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.memory.rank = 3  # type: ignore[misc]


def test_transitions_resolve_auto():
    cfg = load_config(None, ["schedule.chunk_sizes=[1, 4, 8]"])
    assert cfg.schedule.transition(1) == "reset"  # C(1) = 1: the window reading
    assert cfg.schedule.transition(2) == "update"
    cfg = load_config(None, ["schedule.chunk_sizes=[2, 4, 8]"])
    assert cfg.schedule.transition(1) == "update"  # the paper's literal timing


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides({}, ["memory.rank"])
    with pytest.raises(ConfigError, match="exactly section.field"):
        apply_overrides({}, ["rank=3"])


def test_to_dict_is_plain():
    d = config_to_dict(load_config())
    assert isinstance(d["memory"]["capacity"], list)
    assert config_from_dict(d) == load_config()
