"""The Sleep algorithm in one process: wake, consolidate (seed + prune), dream.

This is the reference implementation the Ray system reproduces: `Learner` owns the model and
every optimizer; `run_local` drives it over a stream on the CMS clock.
"""
