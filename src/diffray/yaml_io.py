"""YAML for config files and `key=value` overrides, with bounds.

`yaml.safe_load` builds no objects, but it follows any number of aliases (a "billion laughs" file
expands to gigabytes once anything walks it) and composes nesting recursively (a deep file ends in a
RecursionError). `load` caps the text size, the number of aliases, the nesting depth and the number
of values once aliases are expanded, before constructing anything, and says which limit a document
broke. Pure: no torch, no Ray.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a job or serve config is a few kB
MAX_ALIASES = 100
MAX_DEPTH = 32
MAX_NODES = 100_000  # values once aliases are expanded


class YamlLimitError(ValueError):
    """A document broke one of the limits; the message names it."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlLimitError(f"more than {MAX_ALIASES} aliases (*name); the limit is {MAX_ALIASES}")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlLimitError(f"nested deeper than {MAX_DEPTH} levels; the limit is {MAX_DEPTH}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        """PyYAML keeps the last of two equal keys; a repeated section or key would silently drop settings."""
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; keys after it override
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # unhashable: the base constructor reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads `1e-4` as a string: it wants a dot in the mantissa. YAML 1.2 and JSON read a number,
# which is what a learning rate or a search bound means (so does a string PyYAML writes unquoted, e.g. `0E0`).
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$")
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


def load(text: str) -> Any:
    """Parse one YAML document within the limits. Raises YamlLimitError or yaml.YAMLError."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise YamlLimitError(f"{size} bytes; the limit is {MAX_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expanded(root: yaml.Node) -> None:
    """Values and depth of the document with every alias expanded, counted once per distinct node
    (iteratively: an alias chain may be deeper than Python's recursion limit)."""
    size: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) expanded
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        kids = _children(node)
        if not done:
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in size)
            continue
        values = 1 + sum(size[id(k)][0] for k in kids)
        depth = 1 + max((size[id(k)][1] for k in kids), default=0)
        if values > MAX_NODES:
            raise YamlLimitError(f"more than {MAX_NODES} values once aliases are expanded; the limit is {MAX_NODES}")
        if depth > MAX_DEPTH:
            raise YamlLimitError(f"nested deeper than {MAX_DEPTH} levels once aliases are expanded; "
                                 f"the limit is {MAX_DEPTH}")
        size[id(node)] = (values, depth)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
