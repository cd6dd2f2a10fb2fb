"""Sleep and the continual-learning baselines on one stream (see sleep_ray/bench/continual.py).

    python benchmarks/continual.py --stream synthetic_languages --output runs/bench
"""

import sys

from sleep_ray.bench.continual import main
from sleep_ray.cli import guarded

if __name__ == "__main__":
    sys.exit(guarded(main))
