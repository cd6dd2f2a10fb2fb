"""sleep_ray."""
