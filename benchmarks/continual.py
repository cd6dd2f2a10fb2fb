"""Sleep and the continual-learning baselines on one stream (see sleep_ray/bench/continual.py).

    python benchmarks/continual.py --stream synthetic_languages --output runs/bench
"""

from sleep_ray.bench.continual import main

if __name__ == "__main__":
    main()
