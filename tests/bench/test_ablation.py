"""`sleep-ray bench ablation`: two rows end to end on the tiny model and a micro stream, the table
rebuilt by --table-only, and every row of benchmarks/ablations.yaml valid on the config
it is written for (no run)."""

import json
import math
import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the smoke test's helpers (tests is no package)
from test_continual_smoke import _write_stream  # noqa: E402

from sleep_ray.bench import ablation
from sleep_ray.cli import main as cli_main
from sleep_ray.config import ConfigError, config_differences, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]
# The seeds test's tiny run (tests/bench/test_continual_seeds.py): no pretraining, one seeding
# step, two dreams, a consolidation every 2 wake steps of the 2-task micro stream.
TINY = ["model.pretrain_steps=0", "data.batch_size=4", "memory.capacity=[1, 3, 2]",
        "memory.top_k=[1, 1, 1]", "schedule.windows=[2, 0, 0]", "seeding.steps=1",
        "seeding.num_samples=2", "seeding.max_new_tokens=4", "seeding.group_size=2",
        "dreaming.num_dreams=2", "dreaming.top_k=1", "dreaming.num_random=0",
        "dreaming.max_new_tokens=4", "dreaming.inner_steps=1"]
CELL = r"-?\d+\.\d{3} ± \d+\.\d{3}"


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setattr("sleep_ray.cli.setup_logging", lambda level=None: None)


def _table_rows(text: str) -> list[str]:
    """The lines of ablation.md's main table (before its first section): its header, then one
    line per row."""
    main = text.split("\n## ")[0]
    return [line for line in main.splitlines() if line.startswith("| ")]


def test_two_rows_one_seed_end_to_end_then_table_only(tmp_path, quiet):
    stream = tmp_path / "s.jsonl"
    _write_stream(stream)  # the smoke test's 2-task JSONL stream
    rows = tmp_path / "rows.yaml"
    rows.write_text("# two rows of the ablation, for the tiny test config\n"
                    "full: []\nno_dreaming:\n  - dreaming.enabled=false\n")
    out = tmp_path / "ablation"
    common = ["--rows", str(rows), "--stream", "jsonl", "--path", str(stream), "--seeds", "0",
              "--output", str(out)]
    argv = common + sum((["--set", o] for o in TINY), [])
    assert cli_main(["bench", "ablation"] + argv) == 0  # through the CLI's dispatch

    for row in ("full", "no_dreaming"):
        folder = out / row / "seed0"
        assert {"report.md", "results.csv", "R.csv", "config.yaml"} <= {p.name for p in folder.iterdir()}
        record = json.loads((out / row / "row.json").read_text())
        assert record["overrides"] == ([] if row == "full" else ["dreaming.enabled=false"])
        assert record["set"] == TINY and record["commands"] == ["sleep-ray bench ablation " + shlex.join(argv)]
    assert "enabled: false" in (out / "no_dreaming" / "seed0" / "config.yaml").read_text()

    text = (out / "ablation.md").read_text()
    table = _table_rows(text)
    assert table[0] == "| row | ACC | BWT | forgetting | retention | seeds | seconds | dreams rewarded / kept |"
    assert re.fullmatch(rf"\| full \| {CELL} \| {CELL} \| {CELL} \| {CELL} \| 1 \(0\) \| \d+\.\d ± 0\.0 "
                        rf"\| \d\.\d\d / 1\.00 \(\d+\.0 phases\) \|", table[1])  # top_k 1 + 0 random
    assert table[2].startswith("| no_dreaming | ") and table[2].endswith(" | - |") and len(table) == 3
    assert f"Command: `sleep-ray bench ablation {shlex.join(argv)}`" in text
    assert "| no_dreaming | `dreaming.enabled=false` |" in text  # each row's overrides
    assert "| full | none (the base config) |" in text
    assert "Every row also takes `model.pretrain_steps=0` " in text and f"`--path {stream}`." in text

    summary = json.loads((out / "ablation.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ["full", "no_dreaming"]
    for r in summary["rows"]:
        assert r["seeds"] == [0] and r["n"] == 1
        for metric in ("ACC", "BWT", "forgetting"):
            assert math.isfinite(r["metrics"][metric]["mean"]) and r["metrics"][metric]["std"] == 0.0
        assert r["retention_reference"] == "own R[j][j]"
    full, none = summary["rows"]
    raw = json.loads((out / "full" / "seed0" / "raw.json").read_text())
    assert full["dreams"]["phases"] == len(raw[0]["dreams"]) >= 1 and none["dreams"] is None
    assert full["dreams"]["kept"] == 1.0 and 0.0 <= full["dreams"]["rewarded"] <= 1.0
    assert "statistics.stdev" in summary["std"]

    again = ablation.main(["--table-only", "--rows", str(rows), "--output", str(out)])
    assert _table_rows(again) == table
    assert (out / "ablation.md").read_text() == again
    rebuilt = json.loads((out / "ablation.json").read_text())
    assert rebuilt["commands"][-1] == f"sleep-ray bench ablation --table-only --rows {rows} --output {out}"
    assert [r["metrics"] for r in rebuilt["rows"]] == [r["metrics"] for r in summary["rows"]]
    only = ablation.main(["--table-only", "--only", "no_dreaming", "--output", str(out)])
    assert [line.split(" | ")[0] for line in _table_rows(only)[1:]] == ["| no_dreaming"]

    # the same folder with another --set for its rows: refused before anything runs
    other = TINY[:-1] + ["dreaming.inner_steps=2"]
    with pytest.raises(ValueError, match="holds runs of this row with another set"):
        ablation.main(common + sum((["--set", o] for o in other), []))


def test_rows_come_after_set_and_bad_rows_are_named(tmp_path):
    rows = tmp_path / "rows.yaml"
    rows.write_text("two_levels:\n  - 'memory.capacity=[1, 3]'\n  - 'memory.top_k=[1, 1]'\n"
                    "  - 'schedule.chunk_sizes=[1, 0]'\n  - 'schedule.windows=[2, 0]'\n"
                    "  - 'schedule.learning_rates=[0.01, 0.001]'\nbroken:\n  - memory.top_k=[1]\n")
    loaded = ablation.load_rows(rows)
    assert loaded.written_for is None and list(loaded.rows) == ["two_levels", "broken"]
    # the row's capacity counts over --set's, and the table will say both named it
    (cfg,) = ablation.plan(None, loaded.rows, ["two_levels"], TINY, None, None, [3])["two_levels"].values()
    assert cfg.memory.capacity == (1, 3) and cfg.run.seed == 3 and cfg.seeding.steps == 1
    notes = ablation._record_notes({"two_levels": {"overrides": loaded.rows["two_levels"], "set": TINY}})
    assert notes == ["row two_levels sets memory.capacity, memory.top_k, schedule.windows, which --set "
                     "sets too: the row's value counts"]
    with pytest.raises(ConfigError, match="row 'broken'.*top_k"):
        ablation.plan(None, loaded.rows, ["broken"], [], None, None, [0])
    with pytest.raises(ValueError, match="unknown rows nope; the rows are two_levels, broken"):
        ablation.select_rows(loaded.rows, "two_levels,nope")
    for bad in ("sleep: []\n", "a b: []\n", "x: memory.rank\n", "[]\n"):
        rows.write_text(bad)
        with pytest.raises(ConfigError):
            ablation.load_rows(rows)


def _task_steps(cfg) -> int:
    """Wake steps of one task: batches per epoch x epochs."""
    return math.ceil(cfg.data.train_per_task / cfg.data.batch_size) * cfg.run.epochs_per_task


# Each rows file, the base it is written for, and its stream's wake steps per task and tasks
# (None: from the config's languages stream; the real base's facts stream is 54 train records at
# batch 8 for 8 epochs, two tasks: benchmarks/configs/real_ablation.yaml's make_facts command).
ROWS_FILES = [
    (ablation.DEFAULT_ROWS, "benchmarks/configs/languages_3levels.yaml", None),
    ("benchmarks/ablations_real.yaml", "benchmarks/configs/real_ablation.yaml", (56, 2)),
]


@pytest.mark.parametrize("rows_file, written_for, stream", ROWS_FILES)
def test_every_ablation_row_validates_on_its_base_config(monkeypatch, rows_file, written_for, stream):
    monkeypatch.chdir(REPO)
    rows = ablation.load_rows(rows_file)
    assert rows.written_for == written_for
    base = ablation.resolve_written_for(rows)
    assert list(rows.rows) == ["full", "no_dreaming", "no_injection", "random_selection", "no_lti",
                               "levels_2", "levels_4", "update"]
    full = load_config(base, rows.rows["full"])
    levels = {}
    for name, overrides in rows.rows.items():
        cfg = load_config(base, overrides)
        n = cfg.memory.num_levels
        levels[name] = n
        for tup in (cfg.memory.capacity, cfg.memory.top_k, cfg.memory.ranks, cfg.schedule.chunk_sizes,
                    cfg.schedule.windows, cfg.schedule.transitions, cfg.schedule.learning_rates):
            assert len(tup) in (0, n), (name, tup)  # () = the same value on every level
        # a row changes only the fields it names
        changed = {d.split(":", 1)[0] for d in config_differences(config_to_dict(full), config_to_dict(cfg))}
        assert changed <= {o.split("=", 1)[0] for o in overrides}, (name, changed)
        # the learner is never told where a task ends: no window divides the task, no
        # consolidation falls on a task boundary, and every window runs in the stream
        task, tasks = stream or (_task_steps(cfg), cfg.data.num_tasks)
        total = task * tasks
        for w in cfg.schedule.windows:
            if w:
                assert task % w and w <= total, (name, w, task)
                assert all(step % task for step in range(w, total + 1, w)), (name, w)
                assert w % cfg.schedule.chunk_sizes[0] == 0, (name, w)  # a whole chunk of level 1
        assert [w > 0 for w in cfg.schedule.windows] == [True] * (n - 1) + [False], name
    assert levels == {**{name: 3 for name in rows.rows}, "levels_2": 2, "levels_4": 4}
    assert not load_config(base, rows.rows["no_dreaming"]).dreaming.enabled
    assert not load_config(base, rows.rows["no_injection"]).dreaming.random_expert
    assert load_config(base, rows.rows["random_selection"]).dreaming.selection == "random"
    no_lti = load_config(base, rows.rows["no_lti"]).seeding
    assert not no_lti.lti and no_lti.alpha == 1.0
    assert full.schedule.transition(1) == "reset"
    update = load_config(base, rows.rows["update"]).schedule
    assert update.transition(1) == "update" and update.chunk_sizes[0] == 4
