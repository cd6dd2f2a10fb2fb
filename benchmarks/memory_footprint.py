"""Bytes of one expert, of a full memory state and of the full model (see sleep_ray/bench/footprint.py).

    python benchmarks/memory_footprint.py [--config FILE] [--set k=v ...]

The same as `sleep-ray footprint`: its arguments and --help come from the CLI, which imports
torch and the model code only when the footprint is computed.
"""

import sys

from sleep_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["footprint", *sys.argv[1:]]))
