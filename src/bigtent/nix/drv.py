"""Parser for Nix's ATerm `.drv` files into a Derivation value."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from bigtent.nix.store_path import StorePath

T = TypeVar("T")

_SPECIAL = re.compile(r'["\\]')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
_DYN_DRV_VERSION = "xp-dyn-drv"


class DrvError(ValueError):
    """The text is not a derivation in the ATerm form Nix writes."""


@dataclass(frozen=True, slots=True)
class DerivationOutput:
    """One output: `path` is empty for floating content-addressed outputs; `hash_algo` is like
    `r:sha256` and `hash` is hex for fixed-output ones, both empty for input-addressed ones."""

    path: str
    hash_algo: str
    hash: str


@dataclass(frozen=True, slots=True)
class Derivation:
    outputs: dict[str, DerivationOutput]
    input_drvs: dict[str, tuple[str, ...]]
    input_srcs: tuple[str, ...]
    system: str
    builder: str
    args: tuple[str, ...]
    env: dict[str, str]

    @property
    def name(self) -> str:
        return self.env.get("name", "")

    def _structured_attrs(self) -> dict[str, object] | None:
        raw = self.env.get("__json")
        if raw is None:
            return None
        try:
            attrs = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DrvError(f"derivation {self.name!r} has invalid __json: {exc}") from None
        if not isinstance(attrs, dict):
            raise DrvError(f"derivation {self.name!r} has __json that is not an object")
        return attrs

    @property
    def required_features(self) -> frozenset[str]:
        """Nix's getRequiredSystemFeatures: the requiredSystemFeatures attribute, plus
        `ca-derivations` when an output is floating content-addressed (its path is unknown)."""
        attrs = self._structured_attrs()
        features: set[str] = set()
        if attrs is None:
            features.update(self.env.get("requiredSystemFeatures", "").split())
        else:
            value = attrs.get("requiredSystemFeatures", [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DrvError(
                    f"derivation {self.name!r}: requiredSystemFeatures must be a list of strings"
                )
            features.update(value)
        if any(not out.path and out.hash_algo for out in self.outputs.values()):
            features.add("ca-derivations")
        return frozenset(features)

    @property
    def prefer_local_build(self) -> bool:
        attrs = self._structured_attrs()
        if attrs is None:
            return self.env.get("preferLocalBuild") == "1"
        return attrs.get("preferLocalBuild") is True

    @property
    def references(self) -> tuple[str, ...]:
        """Every store path the derivation depends on directly: input .drvs and sources."""
        return tuple(sorted({*self.input_drvs, *self.input_srcs}))

    @property
    def output_paths(self) -> dict[str, str]:
        return {name: out.path for name, out in self.outputs.items()}

    @property
    def is_fixed_output(self) -> bool:
        """Nix's rule: exactly one output, named out, with a fixed hash."""
        out = self.outputs.get("out")
        return len(self.outputs) == 1 and out is not None and bool(out.hash)


class _Parser:
    """Recursive-descent parser over the text with one cursor; every step is O(length consumed),
    so the whole parse is linear even for multi-megabyte environments."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> DrvError:
        at = self.pos if pos is None else pos
        line = self.text.count("\n", 0, at) + 1
        column = at - (self.text.rfind("\n", 0, at) + 1) + 1
        return DrvError(f"invalid derivation: {message} at offset {at} (line {line}, col {column})")

    def peek(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def expect(self, literal: str) -> None:
        if not self.text.startswith(literal, self.pos):
            found = self.text[self.pos : self.pos + 10]
            raise self.error(f"expected {literal!r}, found {found!r}")
        self.pos += len(literal)

    def string(self) -> str:
        self.expect('"')
        parts: list[str] = []
        text = self.text
        pos = self.pos
        while True:
            match = _SPECIAL.search(text, pos)
            if match is None:
                raise self.error("unterminated string", self.pos - 1)
            start = match.start()
            parts.append(text[pos:start])
            if text[start] == '"':
                self.pos = start + 1
                return "".join(parts)
            if start + 1 >= len(text):
                raise self.error("unterminated string", self.pos - 1)
            escaped = text[start + 1]
            parts.append(_ESCAPES.get(escaped, escaped))
            pos = start + 2

    def list_of(self, item: Callable[[], T]) -> list[T]:
        self.expect("[")
        items: list[T] = []
        if self.peek("]"):
            self.pos += 1
            return items
        while True:
            items.append(item())
            if self.peek(","):
                self.pos += 1
                continue
            self.expect("]")
            return items

    def store_path(self, suffix: str = "") -> str:
        start = self.pos
        text = self.string()
        try:
            path = StorePath.parse(text)
        except ValueError as exc:
            raise self.error(str(exc), start) from None
        if not path.name.endswith(suffix):
            raise self.error(f"{text!r} is not a {suffix} store path", start)
        return text

    def output(self) -> tuple[str, DerivationOutput, int]:
        start = self.pos
        self.expect("(")
        name = self.string()
        self.expect(",")
        path_pos = self.pos
        path = self.string()
        if path:
            try:
                StorePath.parse(path)
            except ValueError as exc:
                raise self.error(str(exc), path_pos) from None
        self.expect(",")
        hash_algo = self.string()
        self.expect(",")
        hash_ = self.string()
        self.expect(")")
        return name, DerivationOutput(path, hash_algo, hash_), start

    def input_drv(self) -> tuple[str, tuple[str, ...], int]:
        start = self.pos
        self.expect("(")
        path = self.store_path(".drv")
        self.expect(",")
        if self.peek("("):
            # Dynamic derivations: (outputs, [(output, child node), ...]).
            self.expect("(")
            outputs = self.list_of(self.string)
            self.expect(",")
            child_pos = self.pos
            self.expect("[")
            if not self.peek("]"):
                raise self.error(
                    "inputs on outputs of dynamic derivations are not supported", child_pos
                )
            self.expect("]")
            self.expect(")")
        else:
            outputs = self.list_of(self.string)
        self.expect(")")
        return path, tuple(outputs), start

    def pair(self) -> tuple[str, str, int]:
        start = self.pos
        self.expect("(")
        key = self.string()
        self.expect(",")
        value = self.string()
        self.expect(")")
        return key, value, start

    def unique(self, what: str, items: list[tuple[str, T, int]]) -> dict[str, T]:
        result: dict[str, T] = {}
        for key, value, pos in items:
            if key in result:
                raise self.error(f"duplicate {what} {key!r}", pos)
            result[key] = value
        return result

    def derivation(self) -> Derivation:
        dynamic = self.peek("DrvWithVersion(")
        if dynamic:
            self.expect("DrvWithVersion(")
            version_pos = self.pos
            version = self.string()
            if version != _DYN_DRV_VERSION:
                raise self.error(f"unsupported derivation version {version!r}", version_pos)
            self.expect(",")
        else:
            self.expect("Derive(")
        outputs = self.unique("output", self.list_of(self.output))
        self.expect(",")
        input_drvs = self.unique("input derivation", self.list_of(self.input_drv))
        self.expect(",")
        input_srcs = tuple(self.list_of(self.store_path))
        self.expect(",")
        system = self.string()
        self.expect(",")
        builder = self.string()
        self.expect(",")
        args = tuple(self.list_of(self.string))
        self.expect(",")
        env = self.unique("environment variable", self.list_of(self.pair))
        self.expect(")")
        if self.text[self.pos :].strip():
            raise self.error("trailing data after the derivation")
        if not outputs:
            raise self.error("derivation has no outputs", 0)
        return Derivation(outputs, input_drvs, input_srcs, system, builder, args, env)


def parse_drv(text: str) -> Derivation:
    """Parse a `.drv` file's text, including the string escapes Nix writes (\\" \\\\ \\n \\r \\t)
    and the `DrvWithVersion("xp-dyn-drv", ...)` form as long as no input depends on the output
    of a dynamic derivation's output."""
    return _Parser(text).derivation()
