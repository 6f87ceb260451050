"""Trainers: one file per method (`train_loop_per_worker` + a builder), the Ray edge in `runner.py`."""
