"""The six systems rows of sleep_ray in one table (see sleep_ray/bench/systems.py).

    python benchmarks/systems.py --output runs/bench_systems           # full: under 15 min, 2 cores
    python benchmarks/systems.py --output /tmp/systems --quick          # smoke: tiny, one repetition
    python benchmarks/systems.py --rows importance,seeding              # a subset
    python benchmarks/systems.py --output runs/bench_systems --profile  # + py-spy on the driver
"""

import sys

from sleep_ray.bench.systems import main
from sleep_ray.cli import guarded

if __name__ == "__main__":  # vLLM spawns its engine: the guard keeps the child from re-running this
    sys.exit(guarded(main))
