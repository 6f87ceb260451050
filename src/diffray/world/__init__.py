"""The shapes world: a procedural, captioned image world (grammar, scenes, renderer, dataset writers), a
classical-vision reader of its images, scores, and `diffray eval` (`diffray.world.evaluate`).

Everything but `evaluate`, `pretrain` (which drive Ray) and `caption_encoder` (torch, in-process) is pure
(numpy, PIL, OpenCV) and never imports ray or torch.
"""

from diffray.world.grammar import (CLASS_PROMPT, COLOURS, HELDOUT, INSTANCE_PROMPT, SHAPES, WORDS, Scene, caption,
                                   parse_prompt)
from diffray.world.reader import Reading, read_scene
from diffray.world.render import render
from diffray.world.scenes import SPLITS, iter_scenes, scene_at
from diffray.world.scores import (accuracy_table, alignment, edge_f1, jpeg_kb, score, shape_iou,
                                  subject_fidelity)
from diffray.world.writers import write_world_dataset

__all__ = ["CLASS_PROMPT", "COLOURS", "HELDOUT", "INSTANCE_PROMPT", "Reading", "SHAPES", "SPLITS", "Scene", "WORDS",
           "accuracy_table", "alignment", "caption", "edge_f1", "iter_scenes", "jpeg_kb", "parse_prompt",
           "read_scene", "render", "scene_at", "score", "shape_iou", "subject_fidelity", "write_world_dataset"]
