"""Nix's ATerm `.drv` files: the parser into a Derivation value, the exact unparse, and the
derivation hashes that input-addressed output paths are made from (Nix 2.8's
`hashDerivationModulo` and `makeOutputPath`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal, TypeVar

from bigtent.nix import base32
from bigtent.nix.store_path import StorePath, make_fixed_output_path, make_store_path

T = TypeVar("T")

_SPECIAL = re.compile(r'["\\]')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
_DYN_DRV_VERSION = "xp-dyn-drv"


class DrvError(ValueError):
    """The text is not a derivation in the ATerm form Nix writes."""


class UnresolvedInput(Exception):
    """An input derivation's wanted output has no known path (``input_paths``)."""

    def __init__(self, drv_path: str, output: str, *, floating: bool) -> None:
        self.drv_path, self.output, self.floating = drv_path, output, floating
        what = "has floating content-addressed outputs" if floating else f"has no output {output!r}"
        super().__init__(f"{drv_path} {what}")


def input_paths(
    input_srcs: Iterable[str],
    input_drvs: Mapping[str, Iterable[str]],
    outputs_of: Mapping[str, Mapping[str, str]],
) -> set[str]:
    """A derivation's input paths, what a build needs valid (pure): its input sources and the
    wanted outputs of its input derivations, whose output paths by name are ``outputs_of``
    (an empty path: floating content-addressed). ``UnresolvedInput`` for a wanted output
    without a path; ``KeyError`` for an input derivation ``outputs_of`` does not know."""
    inputs = set(input_srcs)
    for path, wanted in input_drvs.items():
        outputs = outputs_of[path]
        for name in wanted:
            out = outputs.get(name)
            if not out:
                raise UnresolvedInput(path, name, floating=out is not None)
            inputs.add(out)
    return inputs


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
        return (
            len(self.outputs) == 1
            and out is not None
            and _output_kind("out", out) is OutputKind.FIXED
        )


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


# ---- unparse and derivation hashes (Nix 2.8's derivations.cc) -----------------------------


class OutputKind(Enum):
    """How Nix reads an output's (path, hashAlgo, hash) triple (parseDerivationOutput)."""

    INPUT_ADDRESSED = "input-addressed"
    """A path and no hash algorithm (a hash without an algorithm is ignored, as Nix does)."""
    FIXED = "fixed"
    """An algorithm (`sha256` flat, `r:sha256` recursive) and the expected content hash."""
    FLOATING = "floating"
    """Content-addressed with its path unknown until built: an algorithm and no hash."""
    DEFERRED = "deferred"
    """Input-addressed with its path not computed yet: all three empty."""
    IMPURE = "impure"
    """An algorithm and the hash `impure`."""


def _output_kind(name: str, out: DerivationOutput) -> OutputKind:
    if not out.hash_algo:
        return OutputKind.INPUT_ADDRESSED if out.path else OutputKind.DEFERRED
    _method_algo(name, out)
    if out.hash == "impure":
        kind = OutputKind.IMPURE
    elif out.hash:
        kind = OutputKind.FIXED
    else:
        kind = OutputKind.FLOATING
    if bool(out.path) != (kind is OutputKind.FIXED):
        which = "must" if kind is OutputKind.FIXED else "must not"
        raise DrvError(f"output {name!r}: a {kind.value} output {which} have a path")
    return kind


def _method_algo(name: str, out: DerivationOutput) -> tuple[Literal["flat", "recursive"], str]:
    method: Literal["flat", "recursive"] = "flat"
    algo = out.hash_algo
    if algo.startswith("r:"):
        method, algo = "recursive", algo[2:]
    if algo not in base32.HASH_SIZES:
        raise DrvError(f"output {name!r}: unknown hash algorithm {out.hash_algo!r}")
    return method, algo


_HEX = re.compile(r"[0-9a-fA-F]*")


def _fixed_digest(name: str, out: DerivationOutput) -> bytes:
    """The expected content hash of a fixed output, which Nix reads in hex, nix-base32 or
    base64 (told apart by length: Hash::parseNonSRIUnprefixed) and always writes in hex."""
    _, algo = _method_algo(name, out)
    size = base32.HASH_SIZES[algo]
    text = out.hash
    try:
        if len(text) == 2 * size and _HEX.fullmatch(text):
            digest = bytes.fromhex(text)
        elif len(text) == base32.encoded_length(size):
            digest = base32.decode(text)
        elif ":" not in text and "-" not in text:
            digest = base32.parse_hash(f"{algo}:{text}", algo)
        else:
            raise ValueError(f"{text!r} is not a {algo} digest")
    except ValueError as exc:
        raise DrvError(f"output {name!r}: bad fixed-output hash: {exc}") from None
    if len(digest) != size:
        raise DrvError(f"output {name!r}: bad fixed-output hash {text!r}")
    return digest


def derivation_kind(drv: Derivation) -> OutputKind:
    """Nix's BasicDerivation::type(): all outputs of one kind, and a fixed-output derivation
    has exactly one output, named `out`."""
    kinds = {_output_kind(name, out) for name, out in drv.outputs.items()}
    if not kinds:
        raise DrvError("derivation must have at least one output")
    if len(kinds) > 1:
        raise DrvError(
            "can't mix derivation output types: " + ", ".join(sorted(k.value for k in kinds))
        )
    (kind,) = kinds
    if kind is OutputKind.FIXED:
        if len(drv.outputs) > 1:
            raise DrvError("only one fixed output is allowed")
        if "out" not in drv.outputs:
            raise DrvError('a single fixed output must be named "out"')
    return kind


def output_path_name(drv_name: str, output_name: str) -> str:
    """Nix's outputPathName: the store path name of an output (`out` takes the bare name)."""
    return drv_name if output_name == "out" else f"{drv_name}-{output_name}"


def fixed_output_path(drv: Derivation, drv_name: str, output_name: str = "out") -> str:
    """The path a fixed output is at, made from its expected hash and name (Nix ignores the
    path written in the .drv for fixed outputs and always computes it)."""
    out = drv.outputs[output_name]
    method, algo = _method_algo(output_name, out)
    try:
        return make_fixed_output_path(
            output_path_name(drv_name, output_name), method, algo, _fixed_digest(output_name, out)
        )
    except ValueError as exc:
        raise DrvError(f"output {output_name!r}: {exc}") from None


def _quote(s: str) -> str:
    """Nix's printString: only `"` `\\` newline, carriage return and tab are escaped."""
    if _NEEDS_ESCAPE.search(s) is None:
        return f'"{s}"'
    return '"' + s.translate(_ESCAPE_TABLE) + '"'


_NEEDS_ESCAPE = re.compile(r'["\\\n\r\t]')
_ESCAPE_TABLE = str.maketrans({'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _raw(s: str) -> str:
    """Nix's printUnquotedString, used for names, paths, the system and hashes: no escapes."""
    return f'"{s}"'


def unparse_drv(
    drv: Derivation,
    *,
    mask_outputs: bool = False,
    input_drvs_override: Mapping[str, Iterable[str]] | None = None,
) -> str:
    """The ATerm text Nix writes for ``drv`` (Derivation::unparse), byte for byte.

    As Nix holds a derivation in sorted maps and sets, outputs, input derivations (and their
    output names), sources and the environment come out sorted and without duplicates; the
    builder, arguments and environment are escaped, everything else is written raw. A fixed
    output's hash is written in hex. ``mask_outputs`` blanks the output paths and the
    environment variables named like outputs (what output paths are computed from);
    ``input_drvs_override`` replaces the input derivations (by their hashes modulo).
    """
    parts = ["Derive(["]
    for i, (name, out) in enumerate(sorted(drv.outputs.items())):
        kind = _output_kind(name, out)
        path = "" if mask_outputs else out.path
        if kind is OutputKind.INPUT_ADDRESSED:
            fields = (path, "", "")
        elif kind is OutputKind.FIXED:
            fields = (path, out.hash_algo, _fixed_digest(name, out).hex())
        elif kind is OutputKind.FLOATING:
            fields = ("", out.hash_algo, "")
        elif kind is OutputKind.IMPURE:
            fields = ("", out.hash_algo, "impure")
        else:
            fields = ("", "", "")
        parts.append(("," if i else "") + "(" + ",".join(_raw(f) for f in (name, *fields)) + ")")
    parts.append("],[")
    inputs = drv.input_drvs if input_drvs_override is None else input_drvs_override
    parts.append(
        ",".join(
            f"({_raw(path)},[{','.join(_raw(o) for o in sorted(set(outs)))}])"
            for path, outs in sorted(inputs.items())
        )
    )
    parts.append("],[")
    parts.append(",".join(_raw(p) for p in sorted(set(drv.input_srcs))))
    parts.append(f"],{_raw(drv.system)},{_quote(drv.builder)},[")
    parts.append(",".join(_quote(a) for a in drv.args))
    parts.append("],[")
    masked = drv.outputs if mask_outputs else {}
    parts.append(
        ",".join(
            f"({_quote(k)},{_quote('' if k in masked else v)})" for k, v in sorted(drv.env.items())
        )
    )
    parts.append("])")
    return "".join(parts)


def hash_derivation_modulo(
    drv: Derivation,
    input_hashes: Mapping[str, bytes],
    *,
    drv_name: str | None = None,
    mask_outputs: bool = False,
) -> bytes:
    """Nix 2.8's hashDerivationModulo: the sha256 that stands for ``drv`` in the derivations
    that depend on it, and (with ``mask_outputs``) that its own output paths are made from.

    A fixed-output derivation hashes to sha256("fixed:out:<r:?algo>:<hex>:<out path>"), so
    only what it produces matters, not how. Any other is the sha256 of its unparse with each
    input derivation path replaced by the hex of that input's hash modulo
    (``input_hashes[drv_path]``), the output names of inputs with equal hashes merged.
    ``drv_name`` is the name in the .drv's store path (default: the `name` variable).
    """
    name = drv.name if drv_name is None else drv_name
    kind = derivation_kind(drv)
    if kind is OutputKind.FIXED:
        out = drv.outputs["out"]
        fingerprint = (
            f"fixed:out:{out.hash_algo}:{_fixed_digest('out', out).hex()}:"
            f"{fixed_output_path(drv, name)}"
        )
        return hashlib.sha256(fingerprint.encode()).digest()
    if kind is OutputKind.IMPURE:
        raise DrvError("impure derivations are not supported")
    inputs: dict[str, set[str]] = {}
    for path, outputs in drv.input_drvs.items():
        digest = input_hashes.get(path)
        if digest is None:
            raise DrvError(f"the hash of input derivation {path} is not known")
        for output in outputs:
            inputs.setdefault(digest.hex(), set()).add(output)
    text = unparse_drv(drv, mask_outputs=mask_outputs, input_drvs_override=inputs)
    return hashlib.sha256(text.encode()).digest()


def output_paths_for(drv: Derivation, drv_name: str, hash_modulo: bytes) -> dict[str, str]:
    """The output paths Nix gives ``drv`` (makeOutputPath): ``hash_modulo`` must be its hash
    modulo with its outputs masked (`hash_derivation_modulo(..., mask_outputs=True)`).
    Fixed outputs are where their content hash puts them; floating, deferred and impure
    outputs have no path known in advance, and raise DrvError."""
    kind = derivation_kind(drv)
    if kind is OutputKind.FIXED:
        return {"out": fixed_output_path(drv, drv_name)}
    if kind is not OutputKind.INPUT_ADDRESSED:
        raise DrvError(f"{kind.value} outputs have no path known before they are built")
    paths = {}
    for name in drv.outputs:
        try:
            paths[name] = make_store_path(
                f"output:{name}", hash_modulo, output_path_name(drv_name, name)
            )
        except ValueError as exc:
            raise DrvError(f"output {name!r}: {exc}") from None
    return paths


def expected_output_paths(
    drv: Derivation, drv_name: str, input_hashes: Mapping[str, bytes]
) -> dict[str, str]:
    """The output paths of ``drv`` as Nix computes them from its inputs' hashes modulo."""
    masked = hash_derivation_modulo(drv, input_hashes, drv_name=drv_name, mask_outputs=True)
    return output_paths_for(drv, drv_name, masked)
