"""YAML as this project reads it: PyYAML's safe loader, refusing a key given twice in one mapping.

PyYAML keeps the last of two equal keys without a word, so a knob pasted twice (``memop: 0.504``
then ``memop: 0.6``) would price with the second while the reader sees the first. A duplicate is
a ``yaml.YAMLError`` whose mark is the second key's line, like any other error in the file.
"""
from __future__ import annotations

from typing import IO, Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if seen != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"duplicate key {key!r} (first given at line {seen})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load(stream: str | bytes | IO) -> Any:
    """``yaml.safe_load`` that refuses a duplicate key (``yaml.YAMLError``, marked at it)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)


def error_where(e: yaml.YAMLError) -> tuple[int | None, str]:
    """(1-based line, what is wrong) of a YAML error: its problem at its mark, not PyYAML's
    first line ("while parsing a flow node"), which names neither."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return (mark.line + 1 if mark is not None else None), problem
