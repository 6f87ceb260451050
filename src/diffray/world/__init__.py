"""The shapes world: a procedural, captioned image world (grammar, scenes, renderer, dataset writers), a
classical-vision reader of its images, scores, and `diffray eval` (`diffray.world.evaluate`).

Everything but `evaluate` is pure (numpy, PIL, OpenCV) and never imports ray or torch.
"""

from diffray.world.grammar import (CLASS_PROMPT, COLOURS, HELDOUT, INSTANCE_PROMPT, SHAPES, WORDS, Scene, caption,
                                   parse_prompt)
from diffray.world.render import render
from diffray.world.scenes import SPLITS, iter_scenes, scene_at
from diffray.world.writers import write_world_dataset

__all__ = ["CLASS_PROMPT", "COLOURS", "HELDOUT", "INSTANCE_PROMPT", "SHAPES", "SPLITS", "Scene", "WORDS", "caption",
           "iter_scenes", "parse_prompt", "render", "scene_at", "write_world_dataset"]
