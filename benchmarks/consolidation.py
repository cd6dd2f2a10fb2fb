"""What each consolidation keeps, per transition, over seeds (see sleep_ray/bench/consolidation.py).

    python benchmarks/consolidation.py --config benchmarks/configs/real.yaml --stream jsonl \
        --path facts.jsonl --output runs/bench_consolidation
"""

import sys

from sleep_ray.bench.consolidation import main
from sleep_ray.cli import guarded

if __name__ == "__main__":
    sys.exit(guarded(main))
