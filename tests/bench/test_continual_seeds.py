"""`sleep-ray bench continual --seeds` and `--table-only`: mean ± std over seeds from the runs'
results.csv, worked out by hand; separate method/seed folders; the seed folders of a real run."""

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the smoke test's helpers (tests is no package)
from test_continual_smoke import _write_stream  # noqa: E402

from sleep_ray.bench import continual
from sleep_ray.eval.report import MethodResult

# (ACC, BWT, forgetting, retention, seconds, final row) per method and seed. retention None: undefined.
NUMBERS = {
    "sleep": {0: (0.5, -0.1, 0.1, 0.8, 10.0, [0.4, 0.6]),
              1: (0.6, -0.2, 0.2, 0.8, 20.0, [0.5, 0.7]),
              2: (0.7, -0.3, 0.6, 0.8, 30.0, [0.6, 0.8])},
    "naive_memory": {0: (0.2, 0.0, 0.0, 0.5, 1.0, [0.1, 0.3]),
                     1: (0.4, -0.4, 0.4, 0.7, 2.0, [0.2, 0.6]),
                     2: (0.9, -0.5, 0.5, None, 6.0, [0.9, 0.9])},
}
# By hand: sleep ACC 0.6 ± 0.1 (deviations -0.1 0 0.1); BWT -0.2 ± 0.1; forgetting 0.3 ±
# sqrt((0.04 + 0.01 + 0.09) / 2); retention 0.8 ± 0; seconds 20 ± 10; final (0.5, 0.7).
# naive_memory ACC 0.5 ± sqrt((0.09 + 0.01 + 0.16) / 2); retention over 2 seeds: 0.6 ± sqrt(0.02).


def _write_run(folder, seed_lines, methods_seed, tasks=("colors", "animals"), r_csv=True):
    """A run folder as write_report leaves it: results.csv (+ R.csv's final rows) and the seed in
    `seed_lines` ("config", "report" or nothing)."""
    folder.mkdir(parents=True)
    lines = ["method,ACC,BWT,forgetting,retention,final scores,seconds"]
    long = ["method,after_task,task,score"]
    for method, seed in methods_seed:
        acc, bwt, forg, ret, sec, final = NUMBERS[method][seed]
        lines.append(f"{method},{acc},{bwt},{forg},{'' if ret is None else ret},"
                     f"{' '.join(f'{x:.2f}' for x in final)},{sec}")
        long += [f"{method},0,{t},0.0" for t in tasks] + [f"{method},1,{t},{x}" for t, x in zip(tasks, final)]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    if r_csv:
        (folder / "R.csv").write_text("\n".join(long) + "\n")
    seed = methods_seed[0][1]
    if "config" in seed_lines:
        (folder / "config.yaml").write_text(f"model:\n  name_or_path: tiny\nrun:\n  seed: {seed}\n")
    if "report" in seed_lines:
        (folder / "report.md").write_text(f"# Continual learning: jsonl (2 tasks: colors, animals)\n\n"
                                          f"Command: `sleep-ray bench continual --output {folder.name}`\n\n"
                                          f"- stream: jsonl (2 tasks: colors, animals)\n- seed: {seed}\n\n"
                                          f"| method | ACC |\n|---|---|\n")


def _check_numbers(summary):
    by = {e["method"]: e for e in summary["methods"]}
    assert list(by) == ["sleep", "naive_memory"]  # report order
    s, n = by["sleep"], by["naive_memory"]
    assert s["seeds"] == [0, 1, 2] and s["n"] == 3 and n["seeds"] == [0, 1, 2]
    m = s["metrics"]
    assert m["ACC"]["mean"] == pytest.approx(0.6) and m["ACC"]["std"] == pytest.approx(0.1)
    assert m["ACC"]["values"] == pytest.approx([0.5, 0.6, 0.7])
    assert m["BWT"]["mean"] == pytest.approx(-0.2) and m["BWT"]["std"] == pytest.approx(0.1)
    assert m["forgetting"]["mean"] == pytest.approx(0.3)
    assert m["forgetting"]["std"] == pytest.approx(math.sqrt(0.14 / 2))
    assert m["retention"]["mean"] == pytest.approx(0.8) and m["retention"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert s["seconds"]["mean"] == pytest.approx(20.0) and s["seconds"]["std"] == pytest.approx(10.0)
    assert s["final_scores"]["mean"] == pytest.approx([0.5, 0.7])
    assert s["final_scores"]["tasks"] == ["colors", "animals"]
    m = n["metrics"]
    assert m["ACC"]["mean"] == pytest.approx(0.5) and m["ACC"]["std"] == pytest.approx(math.sqrt(0.26 / 2))
    # retention undefined for seed 2: left out, n = 2
    assert m["retention"]["n"] == 2 and m["retention"]["values"] == [0.5, 0.7, None]
    assert m["retention"]["mean"] == pytest.approx(0.6) and m["retention"]["std"] == pytest.approx(math.sqrt(0.02))
    assert n["seconds"]["mean"] == pytest.approx(3.0) and n["final_scores"]["mean"] == pytest.approx([0.4, 0.6])


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setattr("sleep_ray.cli.setup_logging", lambda level=None: None)


def test_seed_folders_mean_and_sample_std_by_hand(tmp_path, quiet):
    for seed in range(3):
        _write_run(tmp_path / f"seed{seed}", ("config",), [("sleep", seed), ("naive_memory", seed)])
    text = continual.main(["--table-only", "--output", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    _check_numbers(summary)
    assert "statistics.stdev" in summary["std"] and "statistics.stdev" in text
    assert {r["seed_from"] for r in summary["runs"]} == {"config.yaml run.seed"}
    assert summary["commands"][-1] == f"sleep-ray bench continual --table-only --output {tmp_path}"
    md = (tmp_path / "summary.md").read_text()
    assert md == text
    assert f"`sleep-ray bench continual --table-only --output {tmp_path}`" in md
    assert "| method | seeds | ACC | BWT | forgetting | retention | final scores (mean) | seconds |" in md
    assert "| sleep | 3 (0, 1, 2) | 0.600 ± 0.100 | -0.200 ± 0.100 | 0.300 ± 0.265 | 0.800 ± 0.000 | 0.50 0.70 | 20.0 ± 10.0 |" in md
    assert "| naive_memory | 3 (0, 1, 2) | 0.500 ± 0.361 |" in md and "0.600 ± 0.141 (n=2)" in md
    assert "| sleep | 1 | 0.600 | -0.200 | 0.200 | 0.800 | 0.50 0.70 | 20.000 |" in md  # each seed


def _event(source, kept, steps=0.0, seconds=10.0):
    return {"step": 100, "consolidate/source": source, "consolidate/target": source + 1,
            "consolidate/kept": kept, "consolidate/score_before": 0.5, "consolidate/score_after": 0.5 * kept,
            "seed/steps": steps, "consolidate/route_share": 1.0, "consolidate/seconds": seconds,
            "consolidate/seconds_sampling": 2.0}


def test_sleeps_consolidations_over_seeds_by_hand(tmp_path, quiet):
    # raw.json's consolidation rows of the sleep runs: per kind, each seed's events averaged
    # first, then mean ± sample std over seeds, and the lowest event; skipped events left out.
    events = {0: [_event(1, 1.0, 3), _event(1, 0.8, 1), _event(2, 1.0)],
              1: [_event(1, 0.9, 2), _event(1, 1.1, 0), _event(2, 0.7), {**_event(2, 0.1), "consolidate/skipped": 1}],
              2: [_event(1, 1.0, 0), _event(1, 1.0, 0), _event(2, 1.0, seconds=40.0)]}
    for seed in range(3):
        folder = tmp_path / f"seed{seed}"
        _write_run(folder, ("config",), [("sleep", seed), ("naive_memory", seed)])
        (folder / "raw.json").write_text(json.dumps([
            MethodResult("sleep", [[0.0]], 1.0, consolidations=events[seed]).__dict__,
            MethodResult("naive_memory", [[0.0]], 1.0).__dict__]))
    md = continual.main(["--table-only", "--output", str(tmp_path)])
    table = {c["consolidation"]: c for c in json.loads((tmp_path / "summary.json").read_text())["consolidations"]}
    # 1 -> 2: seed means 0.9, 1.0, 1.0 -> 0.9667 ± 0.0577; lowest 0.8; steps (2 + 1 + 0) / 3
    one = table["1 -> 2"]
    assert (one["seeds"], one["events"], one["lowest"]) == (3, 6, 0.8)
    assert one["kept"]["mean"] == pytest.approx(2.9 / 3) and one["kept"]["std"] == pytest.approx(math.sqrt(0.01 / 3))
    assert one["seed_steps"] == pytest.approx(1.0) and one["seconds"] == pytest.approx(12.0)
    # 2 -> 3: 1.0, 0.7, 1.0 -> 0.9 ± 0.1732; seconds (12 + 12 + 42) / 3
    two = table["2 -> 3"]
    assert (two["events"], two["lowest"]) == (3, 0.7) and two["kept"]["mean"] == pytest.approx(0.9)
    assert two["kept"]["std"] == pytest.approx(math.sqrt(0.03)) and two["seconds"] == pytest.approx(22.0)
    assert two["score_after"] == pytest.approx(0.45)
    assert "| 2 -> 3 | 3 (3) | 0.900 ± 0.173 | 0.700 | 0.500 → 0.450 | 0.0 | 1.00 | 22 |" in md


def test_separate_method_and_seed_folders_at_any_depth(tmp_path, quiet):
    # seeds read from config.yaml, report.md's "- seed:" line, or the folder's name; nested deeper
    # too; without R.csv the final scores come from results.csv's "final scores" column.
    _write_run(tmp_path / "sleep_seed0", ("config",), [("sleep", 0)])
    _write_run(tmp_path / "sleep_seed1", ("report",), [("sleep", 1)])
    _write_run(tmp_path / "sleep_seed2", (), [("sleep", 2)], r_csv=False)
    for seed in range(3):
        _write_run(tmp_path / "later" / f"naive_memory_seed{seed}", ("config", "report"),
                   [("naive_memory", seed)])
    continual.main(["--table-only", "--output", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    _check_numbers(summary)
    where = {r["folder"].split("/")[-1]: r["seed_from"] for r in summary["runs"]}
    assert where == {"sleep_seed0": "config.yaml run.seed", "sleep_seed1": "report.md",
                     "sleep_seed2": "folder name", **{f"naive_memory_seed{s}": "config.yaml run.seed"
                                                      for s in range(3)}}
    assert summary["notes"] == []
    # each folder's own command is in the header, then this one
    assert "sleep-ray bench continual --output naive_memory_seed2" in summary["commands"]
    # --methods / --seeds keep a part
    continual.main(["--table-only", "--methods", "sleep", "--seeds", "0,1", "--output", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(e["method"], e["seeds"]) for e in summary["methods"]] == [("sleep", [0, 1])]


def test_retention_vs_single_pairs_each_seed_with_the_same_seed_s_single_run(tmp_path, quiet):
    # Each method and seed in its own folder: retention against `single`'s diagonal can still be
    # had, from the single run of the same seed found anywhere under the output.
    _write_run(tmp_path / "sleep_seed0", ("config",), [("sleep", 0)])
    _write_run(tmp_path / "sleep_seed1", ("config",), [("sleep", 1)])
    single = tmp_path / "other" / "single_seed0"  # seed 0 only: R[0][0] = 0.8, R[1][1] = 0.4
    single.mkdir(parents=True)
    (single / "results.csv").write_text("method,ACC,BWT,forgetting,retention,final scores,seconds\n"
                                        "single,0.3,0.0,0.0,,0.20 0.40,5.0\n")
    (single / "R.csv").write_text("method,after_task,task,score\nsingle,0,colors,0.8\n"
                                  "single,0,animals,0.1\nsingle,1,colors,0.2\nsingle,1,animals,0.4\n")
    (single / "config.yaml").write_text("model:\n  name_or_path: tiny\nrun:\n  seed: 0\n")
    broken = tmp_path / "single_seed1"  # its R.csv lacks R[1][1]: no diagonal, never a guess
    broken.mkdir()
    (broken / "results.csv").write_text((single / "results.csv").read_text())
    (broken / "R.csv").write_text("method,after_task,task,score\nsingle,0,colors,0.8\n"
                                  "single,0,animals,0.1\nsingle,1,colors,0.2\n")
    (broken / "config.yaml").write_text("model:\n  name_or_path: tiny\nrun:\n  seed: 1\n")
    continual.main(["--table-only", "--output", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    by = {e["method"]: e for e in summary["methods"]}
    # seed 0: Sleep's final row (0.4, 0.6), mean 0.5, over single's diagonal (0.8, 0.4), mean 0.6;
    # seed 1's single run has no diagonal: no value, said by n.
    vs = by["sleep"]["metrics"]["retention vs single"]
    assert vs["values"] == [pytest.approx(0.5 / 0.6), None] and vs["n"] == 1
    assert vs["mean"] == pytest.approx(0.5 / 0.6) and vs["std"] == 0.0
    assert "retention vs single" not in by["single"]["metrics"]
    table = (tmp_path / "summary.md").read_text()
    assert "retention vs single" in table and "0.833 ± 0.000 (n=1)" in table


def test_duplicates_and_misnamed_folders_are_noted(tmp_path, quiet):
    for seed in range(3):
        _write_run(tmp_path / f"sleep_seed{seed}", ("config",), [("sleep", seed)])
    # run with --output .../sleep_seed5 but without --set run.seed=5: config.yaml says 0
    _write_run(tmp_path / "sleep_seed5", ("config",), [("sleep", 0)])
    (tmp_path / "sleep_seed5" / "config.yaml").write_text("run:\n  seed: 0\n")
    old = time.time() - 100
    os.utime(tmp_path / "sleep_seed0" / "results.csv", (old, old))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.csv").write_text("a,b\n1,2\n")
    summary_md = continual.main(["--table-only", "--output", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    (sleep,) = summary["methods"]
    assert sleep["seeds"] == [0, 1, 2] and sleep["folders"][0].endswith("sleep_seed5")  # the newer
    notes = " ".join(summary["notes"])
    assert "named seed 5 but its config.yaml run.seed says 0" in notes
    assert "sleep seed 0 is in both" in notes and "broken" in notes
    assert "## Notes" in summary_md


def test_no_results_is_one_error(tmp_path, quiet):
    with pytest.raises(FileNotFoundError, match="no results.csv"):
        continual.main(["--table-only", "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="--seeds"):
        continual.parse_seeds("0,x")
    with pytest.raises(ValueError, match="twice"):
        continual.parse_seeds("1,1")


def _fake_run_method(method, cfg, stream, bcfg):
    """R from the seed: ACC of the last row = 0.1 * (seed + 1) (+ 0.5 for sleep)."""
    x = 0.1 * (cfg.run.seed + 1) + (0.5 if method == "sleep" else 0.0)
    T = len(stream.tasks)
    return MethodResult(method, [[x] * T for _ in range(T)], float(cfg.run.seed))


def _stream(path):
    _write_stream(path)  # the smoke test's 2-task JSONL stream
    return str(path)


def test_seeds_write_seed_folders_then_summary(tmp_path, quiet, monkeypatch):
    monkeypatch.setattr(continual, "run_method", _fake_run_method)
    base = ["--stream", "jsonl", "--path", _stream(tmp_path / "s.jsonl"), "--methods", "sleep,naive_memory"]
    # without --seeds: one run into OUTPUT itself, as before (no seed folders, no summary)
    continual.main(base + ["--set", "run.seed=4", "--output", str(tmp_path / "one")])
    assert (tmp_path / "one" / "report.md").exists() and not (tmp_path / "one" / "summary.md").exists()
    assert "- seed: 4" in (tmp_path / "one" / "report.md").read_text()
    out = tmp_path / "three"
    text = continual.main(base + ["--seeds", "0,1,2", "--output", str(out)])
    for seed in range(3):
        folder = out / f"seed{seed}"
        assert {"report.md", "results.csv", "R.csv", "config.yaml", "heatmaps.png", "curves.png"} <= {
            p.name for p in folder.iterdir()}
        assert f"seed: {seed}\n" in (folder / "config.yaml").read_text()
    assert not (out / "results.csv").exists()
    summary = json.loads((out / "summary.json").read_text())
    sleep = summary["methods"][0]
    assert sleep["method"] == "sleep" and sleep["seeds"] == [0, 1, 2]
    assert sleep["metrics"]["ACC"]["mean"] == pytest.approx(0.7) and sleep["metrics"]["ACC"]["std"] == pytest.approx(0.1)
    assert sleep["seconds"]["values"] == [0.0, 1.0, 2.0]
    assert summary["commands"] == ["sleep-ray bench continual " + " ".join(base + ["--seeds", "0,1,2", "--output", str(out)])]
    assert text == (out / "summary.md").read_text() and "wall time" in text
    # --table-only on the same folder gives the same table
    again = continual.main(["--table-only", "--output", str(out)])
    table = lambda t: [line for line in t.splitlines() if line.startswith("| sleep |")]
    assert table(again) == table(text)


def test_seeds_on_the_tiny_model(tmp_path, quiet):
    """A real tiny run (the smoke test's sizes): three seed folders and the summary."""
    tiny = ["model.pretrain_steps=0", "data.batch_size=4", "memory.capacity=[1, 3, 2]",
            "memory.top_k=[1, 1, 1]", "schedule.windows=[2, 0, 0]", "seeding.steps=1",
            "seeding.num_samples=2", "seeding.max_new_tokens=4", "seeding.group_size=2",
            "dreaming.num_dreams=2", "dreaming.top_k=1", "dreaming.num_random=0",
            "dreaming.max_new_tokens=4", "dreaming.inner_steps=1"]
    out = tmp_path / "bench"
    continual.main(["--stream", "jsonl", "--path", _stream(tmp_path / "s.jsonl"), "--methods",
                    "sleep,naive_memory", "--seeds", "0,1,2", "--output", str(out)]
                   + sum((["--set", o] for o in tiny), []))
    assert all((out / f"seed{s}" / "results.csv").exists() for s in range(3))
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["method"], e["n"]) for e in summary["methods"]] == [("sleep", 3), ("naive_memory", 3)]
    for e in summary["methods"]:
        values = e["metrics"]["ACC"]["values"]
        assert e["metrics"]["ACC"]["mean"] == pytest.approx(sum(values) / 3)
        assert len(e["final_scores"]["mean"]) == 2
    assert "| sleep | 3 (0, 1, 2) |" in (out / "summary.md").read_text()


def test_a_run_stopped_after_some_methods_counts_the_ones_it_finished(tmp_path, quiet):
    # raw.json is written after each method, results.csv at the end: --table-only writes the
    # missing report files from raw.json, so the finished methods are in the summary.
    from dataclasses import asdict

    stream = tmp_path / "s.jsonl"
    _write_stream(stream)
    folder = tmp_path / "stopped_seed1"
    folder.mkdir()
    (folder / "config.yaml").write_text(f"model:\n  name_or_path: tiny\ndata:\n  stream: jsonl\n"
                                        f"  path: {stream}\nrun:\n  seed: 1\n")
    done = MethodResult("naive_lora", [[0.8, 0.1], [0.2, 0.6]], 12.0)
    (folder / "raw.json").write_text(json.dumps([asdict(done)]))
    continual.main(["--table-only", "--output", str(tmp_path)])
    assert (folder / "results.csv").exists() and "raw.json" in (folder / "report.md").read_text()
    (entry,) = json.loads((tmp_path / "summary.json").read_text())["methods"]
    assert entry["method"] == "naive_lora" and entry["seeds"] == [1]
    # By hand: ACC = (0.2 + 0.6) / 2, BWT = 0.2 - 0.8, final row (0.2, 0.6).
    assert entry["metrics"]["ACC"]["mean"] == pytest.approx(0.4)
    assert entry["metrics"]["BWT"]["mean"] == pytest.approx(-0.6)
    assert entry["final_scores"]["mean"] == pytest.approx([0.2, 0.6])
    assert entry["final_scores"]["tasks"] == ["colors", "animals"]
