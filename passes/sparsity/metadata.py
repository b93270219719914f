"""The record of which weights are sparse and how, in the model's `metadata_props`.

Key `onnxforge.sparsity`, value a JSON object with one entry per sparsified initializer:

    {"<initializer name>": {"pattern": "unstructured" | "block(RxC)" | "N:M",
                            "sparsity": <fraction of the initializer's elements that are 0>,
                            "shape": [<the initializer's dims>]}}

The pattern is the one the zeros were chosen by, on the weight's 2-D view (see
`layers`: [outputs, inputs], reduction axis last); `sparsity` counts the zeros actually
stored (a weight that was already 0 counts too). The ONNX stays dense: a backend reads
this key to choose sparse kernels for these weights. A later `sparsify` run merges its
entries into the existing ones; a pass that renames or re-encodes a weight afterwards
(e.g. `quantize`) leaves its entry naming an initializer that is gone, which a reader
must skip.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

SPARSITY_KEY = "onnxforge.sparsity"


def entry(pattern: str, array: np.ndarray) -> dict[str, Any]:
    """The metadata entry of one stored weight."""
    zeros = int(array.size - np.count_nonzero(array))
    return {"pattern": pattern, "sparsity": zeros / array.size if array.size else 0.0,
            "shape": [int(d) for d in array.shape]}


def read_sparsity(model: ir.Model) -> dict[str, dict[str, Any]]:
    """The model's sparsity record (empty when it has none)."""
    text = model.metadata_props.get(SPARSITY_KEY)
    return json.loads(text) if text else {}


def record_sparsity(model: ir.Model, entries: dict[str, dict[str, Any]]) -> None:
    """Merge `entries` (initializer name -> entry) into the model's record (a record that
    is not valid JSON is replaced)."""
    try:
        merged = read_sparsity(model)
    except ValueError:
        merged = {}
    if not isinstance(merged, dict):
        merged = {}
    merged.update(entries)
    model.metadata_props[SPARSITY_KEY] = json.dumps(merged, sort_keys=True)
