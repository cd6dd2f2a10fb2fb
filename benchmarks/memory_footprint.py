"""Bytes of one expert, of a full memory state and of the full model (see sleep_ray/bench/footprint.py).

    python benchmarks/memory_footprint.py [--config FILE] [--set k=v ...]
"""

from sleep_ray.bench.footprint import main

if __name__ == "__main__":
    main()
