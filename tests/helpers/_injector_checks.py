"""Faults and comparisons shared by the injector tests (the conformance suite's and the
per-framework ones): a fault at one explicit position, bit-equality, one replica untouched."""

from __future__ import annotations

import numpy as np

from faultlab.faults import FaultSpec, PositionSpec, ValueSpec


def fault(site, layer, pos, value=1e3, replica=1, tensor=None, model="set", **kw):
    vs = ValueSpec(model, values=(value,), **kw) if model == "set" else ValueSpec(model, **kw)
    return FaultSpec(site=site, layer=layer, value=vs,
                     positions=PositionSpec("explicit", indices=(pos,)), replica=replica,
                     tensor=tensor, step=0)


def same(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def assert_replica_untouched(clean, hit, r):
    for k in ("c1", "a1", "c2", "logits", "dx"):
        assert same(clean[r][k], hit[r][k]), f"replica {r}: {k} changed"
    for n in clean[r]["g"]:
        assert same(clean[r]["g"][n], hit[r]["g"][n]), f"replica {r}: gradient {n} changed"
