"""The continual benchmark end to end on a tiny JSONL stream (so it cannot rot)."""

import json

import pandas as pd

from sleep_ray.cli import main as cli_main


def _write_stream(path):
    rows = []
    for task, word in (("colors", "red"), ("animals", "cat")):
        for split, n in (("train", 8), ("val", 2), ("test", 2)):
            for i in range(n):
                rows.append({"task": task, "split": split, "prompt": f"{task} {i}:",
                             "completion": f" {word}", "choices": [" red", " cat"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_bench_continual_on_jsonl_writes_report_csv_and_plots(tmp_path):
    stream = tmp_path / "s.jsonl"
    _write_stream(stream)
    out = tmp_path / "bench"
    tiny = ["model.pretrain_steps=0", "data.batch_size=4", "memory.capacity=[1, 3, 2]",
            "memory.top_k=[1, 1, 1]", "schedule.windows=[2, 0, 0]", "seeding.steps=1",
            "seeding.num_samples=2", "seeding.max_new_tokens=4", "seeding.group_size=2",
            "dreaming.num_dreams=2", "dreaming.top_k=1", "dreaming.num_random=0",
            "dreaming.max_new_tokens=4", "dreaming.inner_steps=1"]
    argv = ["continual", "--stream", "jsonl", "--path", str(stream), "--methods", "sleep,naive_memory,single",
            "--output", str(out)] + sum((["--set", o] for o in tiny), [])
    assert cli_main(["bench"] + argv) == 0
    report = (out / "report.md").read_text()
    assert "sleep-ray bench continual" in report and "| sleep |" in report
    # Sleep's consolidations, as its run report has them: a 1 -> 2 at every window of 2 steps.
    raw = {r["method"]: r for r in json.loads((out / "raw.json").read_text())}
    events = raw["sleep"]["consolidations"]
    assert events and all(e["consolidate/source"] == 1 for e in events)
    assert [r["consolidations"] for r in raw.values() if r["method"] != "sleep"] == [[], []]
    # Every training step's loss: Sleep's wake steps and naive fine-tuning's are the same steps.
    steps = {m: [step for step, _ in r["losses"]] for m, r in raw.items()}
    assert steps["sleep"] and steps["sleep"] == steps["naive_memory"]
    assert all(loss == loss for r in raw.values() for _, loss in r["losses"])
    table = report.split("## Consolidations (sleep)")[1]
    assert table.count("| 1 -> 2 |") == len(events)
    df = pd.read_csv(out / "results.csv")
    assert list(df["method"]) == ["sleep", "naive_memory", "single"]
    assert (out / "heatmaps.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    long = pd.read_csv(out / "R.csv")
    assert len(long) == 3 * 2 * 2  # methods x rows (after each task) x tasks
