"""The systems benchmark: a quick end-to-end run (all ten rows, tiny sizes, one repetition), the
actor telemetry helper, and the overhead arithmetic on numbers worked out by hand. No timing is
asserted anywhere."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest

from sleep_ray.actors.telemetry import compute_timed, peak_rss_bytes, reset_peak_rss, telemetry
from sleep_ray.bench import systems as S
from sleep_ray.bench import systems_driver as D


class _Worker:
    @compute_timed
    def outer(self, n: int) -> int:
        time.sleep(0.01)
        return self.inner(n) + 1

    @compute_timed
    def inner(self, n: int) -> int:
        return n * 2


def test_compute_timed_counts_nested_calls_once():
    w = _Worker()
    assert w.outer(3) == 7
    assert w.inner(1) == 2  # a direct call counts for itself
    tel = telemetry(w)
    assert tel["calls"] == {"outer": 1, "inner": 1}
    assert tel["compute_seconds"]["outer"] >= 0.01  # it slept that long inside
    assert tel["pid"] > 0 and tel["peak_rss_bytes"] > 0


def test_peak_rss_includes_child_processes():
    """A child holding ~200 MiB raises the tree's peak by about that much."""
    alone = peak_rss_bytes(children=False)
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                              "print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        tree = peak_rss_bytes()
    finally:
        child.kill()
        child.wait()
    assert tree - alone > 150 * 2**20


def test_reset_peak_rss_forgets_an_earlier_peak():
    held = bytearray(200 * 2**20)
    held[::4096] = b"x" * len(held[::4096])  # touch every page: resident
    del held
    before = peak_rss_bytes(children=False)
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert before - peak_rss_bytes(children=False) > 150 * 2**20


def test_overhead_arithmetic_by_hand():
    # Driver: dream 10 s of which generate 3, importance 2, lora 1, learn 1, its sync 0.5 -> the
    # rest 2.5; sync 1.5 in all (0.5 of it inside the dream); consolidate 4 + 2 = 6.
    phase = {"wake": 5.0, "update": 0.5, "sync": 1.5, "consolidate_1_to_2": 4.0,
             "consolidate_2_to_3": 2.0, "dream": 10.0, "dream/generate": 3.0,
             "dream/importance": 2.0, "dream/lora": 1.0, "dream/learn": 1.0, "dream/sync": 0.5,
             "evaluate": 1.0}
    wall = D.driver_wall(phase)
    assert wall["consolidate"] == 6.0 and wall["dream/other"] == pytest.approx(2.5)
    # Two scorers: the pool's time is the slower one's (3 s), not the sum.
    tel = {"learner": [{"compute_seconds": {"wake_step": 4.5, "consolidate": 5.0, "dream_context": 0.5},
                        "calls": {"wake_step": 10, "consolidate": 2, "dream_context": 1}}],
           "rollout": [], "scorer": [{"compute_seconds": {"importance": 1.0}, "calls": {"importance": 1}},
                                     {"compute_seconds": {"importance": 1.5}, "calls": {"importance": 1}}]}
    compute, calls = D.actor_compute(tel)
    assert compute == {"wake": 4.5, "consolidate": 5.0, "dream/other": 0.5, "dream/importance": 1.5}
    bd = D.overhead_breakdown(wall, compute, calls)
    assert bd["wake"]["overhead_s"] == pytest.approx(0.5) and bd["wake"]["calls"] == 10
    assert bd["dream/importance"]["overhead_s"] == pytest.approx(0.5)
    assert bd["dream/generate"]["overhead_s"] == 3.0  # no actor time recorded: all overhead
    # cycle wall 5+0.5+1.5+6+3+2+1+1+2.5 = 22.5; actor 4.5+5+0.5+1.5 = 11.5; overhead 11/22.5
    assert D.overhead_fraction(bd, D.CYCLE_PHASES) == pytest.approx(11.0 / 22.5)


@pytest.mark.slow
def test_run_systems_quick(tmp_path):
    S.run_systems(tmp_path, quick=True)
    md = (tmp_path / "systems.md").read_text()
    report = json.loads((tmp_path / "systems.json").read_text())
    indices = {row["index"] for row in report["rows"]}
    assert indices == {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
    for group in S.ROW_GROUPS:
        assert f"| {group.index} |" in md
    assert "python benchmarks/systems.py" in md and "torch" in report["versions"]
    mine = [r for r in report["rows"] if r["index"] >= 3]
    assert not [r["name"] for r in mine if "FAILED" in r["name"]], mine
    if importlib.util.find_spec("sleep_ray.bench.systems_rollout") is not None:
        failed = [r["limits"] for r in report["rows"] if "FAILED" in r["name"]]
        assert not failed, failed
        _assert_rollout_rows([r for r in report["rows"] if r["index"] == 1])
    by_index = {r["index"]: r for r in report["rows"]}
    assert by_index[3]["details"]["config_m"]["max_abs_diff"] < 1e-5  # batched == loop norms
    assert by_index[4]["ours"] > 0 and by_index[4]["baseline"] > 0
    assert set(by_index[5]["details"]["breakdown"]) >= set(D.CYCLE_PHASES)
    assert 0 <= by_index[5]["ours"] <= 1
    assert set(by_index[6]["details"]["peak_rss_mib"]) == {"learner", "rollout", "scorer", "driver"}
    assert by_index[7]["details"]["result"]["max_abs_tau_diff"] < 1e-4  # batched == loop copies
    assert by_index[8]["details"]["wake_steps"] == by_index[8]["details"]["window"]  # one window
    assert by_index[8]["baseline"] > 0 and by_index[8]["ours"] > 0
    nine = by_index[9]["details"]  # both methods over the same wake steps; Sleep slept
    assert nine["consolidations"] > 0 and 0 < nine["consolidation_seconds"] < nine["sleep_seconds"]
    assert by_index[9]["ratio"] == pytest.approx(nine["naive_seconds"] / nine["sleep_seconds"])
    ten = by_index[10]["details"]  # the shared prompt classifies as the whole sequences do
    assert ten["pairs"] > ten["questions"] > 0 and ten["same_predictions"] == ten["questions"]


def _assert_rollout_rows(rows: list[dict]) -> None:
    """Row 1 (quick): vLLM and HF timed on the same tokens, for the tiny and the small model."""
    from sleep_ray.bench.systems_rollout import QUICK_SIZE

    assert len(rows) == 2 and "(tiny," in rows[0]["name"] and "(small," in rows[1]["name"]
    for row in rows:
        d = row["details"]
        assert row["unit"] == "tok/s" and row["goal"] == 5.0
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
        # Greedy on the same float32 model: both backends return the same completions.
        assert d["greedy_rows_equal"] == f"{QUICK_SIZE.prompts}/{QUICK_SIZE.prompts}"
        assert d["hf_tokens"] == d["vllm_tokens"] > 0
        assert row["baseline"] == pytest.approx(d["hf_tokens"] / d["hf_seconds"][0])
        assert row["ours"] == pytest.approx(d["vllm_tokens"] / d["vllm_seconds"][0])
    assert rows[1]["details"]["params"] > rows[0]["details"]["params"]
