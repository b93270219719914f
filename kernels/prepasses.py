"""Relax-level passes the default CPU schedules want before legalization.

The default schedules keep the model's NCHW layout and pack weights themselves (inside
``default_schedule_pass``), so no layout conversion is required: the list is empty
today. It exists so the backend has one stable place to ask.
"""

from __future__ import annotations

import tvm


def relax_prepasses(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Passes to run on the imported Relax module before LegalizeOps (currently none)."""
    return []
