"""sleep_ray."""

import os as _os

if _os.environ.get("SLEEP_RAY_ENGINES"):  # a child of a quieted process (a Ray actor, a spawned worker)
    from sleep_ray.logs import apply_inherited as _apply_inherited

    _apply_inherited()
