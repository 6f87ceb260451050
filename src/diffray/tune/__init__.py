"""Hyperparameter search over training configs with Ray Tune."""
