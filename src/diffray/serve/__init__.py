"""Serving: one Ray Serve application (`diffray.serve.app:build_app`) with an Ingress (FastAPI:
OpenAI-style images API, full generate API, auth, limits) and a Generator (pipeline, multiplexed adapters
from an `AdapterRegistry`, dynamic batching). Importing this package imports neither ray nor torch."""
