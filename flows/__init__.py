"""Prefect orchestration of the HAP daily retraining: *when* and *where*, never *how*.

The steps live in ``hap/`` as plain functions; the flows here wrap them in Prefect tasks with
retries, concurrency limits, artifacts and events. ``hap/`` never imports this package.
"""
