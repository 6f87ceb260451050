"""Helpers the tests and the benchmarks share (never shipped in the package): failure drills as a hooks
plugin, small models and untrained adapters built from code, free local ports."""
