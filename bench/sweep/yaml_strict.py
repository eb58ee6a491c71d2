"""YAML that refuses a key given twice in one mapping.

PyYAML keeps the last of two equal keys without a word: a sweep file with a second `base:` lost the
first. The loader here checks each mapping's keys as it builds it, with the line of both.
"""

from __future__ import annotations

from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKey(ValueError):
    """A key given twice in one mapping; lines are 1-based."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        self.key, self.first_line, self.second_line = key, first_line, second_line
        where = f"lines {first_line} and {second_line}" if first_line != second_line else f"line {first_line}"
        super().__init__(f"{key}: given twice, on {where}; keep one")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, but a mapping with a repeated key raises DuplicateKey."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor` may be overridden by design
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(key, seen[key], line)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            seen[key] = line
        return super().construct_mapping(node, deep)


def load(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (DuplicateKey) as well as bad YAML (yaml.YAMLError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
