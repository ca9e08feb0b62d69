"""What an ``assign`` carries of its step's derivation (pure): the .drv's text and the step's
resolved input paths, when both are known and fit the message; else neither, and the agent
fetches the .drv from the cache as it does from a runner that never sends them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from bigtent.nix.drv import UnresolvedInput, input_paths
from bigtent.protocol import MAX_ASSIGN_DRV_BYTES, MAX_ASSIGN_INPUTS
from bigtent.runner.scheduler.reads import AssignedDrv


@dataclass(frozen=True, slots=True)
class Carried:
    """The ``drv_text`` and ``inputs`` of one ``assign``."""

    drv_text: str
    inputs: list[str]


def resolve_inputs(
    drv: AssignedDrv, outputs_of: Mapping[str, Mapping[str, str]]
) -> list[str] | None:
    """The step's input paths (``drv.input_paths``, sorted); None when an input derivation is
    not recorded or a wanted output of one has no fixed path."""
    try:
        return sorted(input_paths(drv.input_srcs, drv.input_drvs, outputs_of))
    except (KeyError, UnresolvedInput):
        return None


def carried(drv: AssignedDrv | None, outputs_of: Mapping[str, Mapping[str, str]]) -> Carried | None:
    """What the assignment of a step whose derivation is ``drv`` carries (None: nothing,
    ``drv`` unknown or without its text, its inputs unresolved, or beyond the bounds: at most
    ``MAX_ASSIGN_INPUTS`` inputs and ``MAX_ASSIGN_DRV_BYTES`` of JSON for text and inputs)."""
    if drv is None:
        return None
    inputs = resolve_inputs(drv, outputs_of)
    if inputs is None or len(inputs) > MAX_ASSIGN_INPUTS:
        return None
    budget = MAX_ASSIGN_DRV_BYTES - sum(len(path) + 3 for path in inputs)
    # ASCII JSON: at least as long as the UTF-8 the message is sent in.
    if budget < len(drv.text) or len(json.dumps(drv.text)) > budget:
        return None
    return Carried(drv.text, inputs)
