"""benchmarks/shift_replay.py: the shift rule replayed on recorded loss series."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _series(tasks: int, per_task: int, spike_at: int | None = None) -> list[list[float]]:
    """Each task's loss falls from 5.0 to 0.2; optionally one mid-task jump (a divergence)."""
    out, step = [], 0
    for _ in range(tasks):
        for i in range(per_task):
            step += 1
            loss = max(0.2, 5.0 - 0.5 * i)
            out.append([step, 6.0 if step == spike_at else loss])
    return out


def test_it_finds_the_boundaries_and_says_where_else_it_fired(tmp_path):
    runs = [{"method": "naive_memory", "R": [[0.0] * 3] * 3, "losses": _series(3, 20)},
            {"method": "replay", "R": [[0.0] * 3] * 3, "losses": _series(3, 20, spike_at=31)},
            {"method": "joint", "R": [[0.0] * 3], "losses": _series(1, 60)}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "raw.json").write_text(json.dumps(runs))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/shift_replay.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = out.splitlines()
    assert "fired [20, 40]  found 2/2  elsewhere []" in lines[0]
    # 0.2 for 8 steps, then 6.0 at step 31: a shift after step 30, not a boundary.
    assert "fired [20, 30, 40]  found 2/2  elsewhere [30]" in lines[1]
    assert "boundaries []  fired []" in lines[2]
    assert lines[-1] == ("total: 3 series, 4 of 4 task boundaries found, 1 sleeps where no task "
                         "begins")
