"""YAML for configs: a loader that reads `1e-4` as a float and refuses duplicate keys, a dumper
that writes back what the loader reads, and one-line messages for YAML syntax errors."""

import re
from collections.abc import Hashable

import yaml

# YAML 1.1 reads `1e-4` as a string; researchers write learning rates that way, so our loader
# reads it as a float and our dumper quotes a string that looks like one (else a config.yaml
# with output_dir='2e-4' would not load back).
_FLOAT_TAG, _MERGE_TAG = "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"
_SCIENTIFIC_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float and refuses duplicate keys (YAML keeps the last
    one silently, so `max_steps: 5` ... `max_steps: 7` would run 7 steps without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # SafeLoader says "found unhashable key"
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class YamlDumper(yaml.SafeDumper):
    """SafeDumper that quotes the strings YamlLoader would read as floats."""


YamlLoader.add_implicit_resolver(_FLOAT_TAG, _SCIENTIFIC_FLOAT, list("-+0123456789."))
YamlDumper.add_implicit_resolver(_FLOAT_TAG, _SCIENTIFIC_FLOAT, list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line with its positions, without PyYAML's '<unicode string>'."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return str(err)
    parts = [(err.context, err.context_mark), (err.problem, err.problem_mark)]
    return ": ".join(f"{text} (line {mark.line + 1}, column {mark.column + 1})"
                     for text, mark in parts if text and mark)
