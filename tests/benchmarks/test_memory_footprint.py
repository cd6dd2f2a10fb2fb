import subprocess
import sys
from pathlib import Path

from sleep_ray.config import MemoryConfig
from sleep_ray.model.footprint import footprint, qwen3_8b_config

ROOT = Path(__file__).resolve().parents[2]


def test_qwen3_8b_counts_match_hand_arithmetic():
    mem = MemoryConfig(rank=8, capacity=(1, 8, 4), top_k=(1, 1, 1), router_prototypes=1)
    f = footprint(qwen3_8b_config(), mem)
    # One expert at one layer, bf16: (4096*8 + 8*4096 + 4096) * 2 bytes = 139264 bytes.
    assert f.expert_bytes == 139264
    # Qwen3-8B has ~8.19e9 parameters (bf16: ~16.4e9 bytes); the memory adds a few MB.
    assert 16.0e9 < f.model_bytes < 16.6e9
    # State: 36 layers x 13 slots x (expert + mask (bool, 1 byte) + usage and router bias (bf16,
    # 2 bytes each)).
    assert f.memory_state_bytes == 36 * 13 * (139264 + 1 + 2 + 2)


def test_router_prototypes_are_counted():
    # The default router keeps 32 prototype keys per expert: (4096*8 + 8*4096 + 32*4096) * 2
    # bytes = 393216 bytes at one layer.
    f = footprint(qwen3_8b_config(), MemoryConfig(rank=8, capacity=(1, 8, 4), top_k=(1, 1, 1)))
    assert f.expert_bytes == 393216
    assert f.memory_state_bytes == 36 * 13 * (393216 + 1 + 2 + 2)


def test_benchmark_prints_both_rows():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/memory_footprint.py")],
                         capture_output=True, text=True, check=True).stdout
    assert "tiny (qwen3" in out and "Qwen3-8B shape" in out
