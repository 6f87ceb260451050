"""diffray: fine-tune, search and serve Stable Diffusion adapters on a Ray cluster."""

__version__ = "0.1.0"
