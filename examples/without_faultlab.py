"""A stand-in for ``faultlab.torch`` that does nothing: the example tests swap it in to run
an example's loop as it was before faultlab's lines were added, and compare."""

from __future__ import annotations

import contextlib


class Injector:
    def __init__(self, *a, **k):
        pass

    def arm(self, faults):
        assert not faults

    def step(self, step):
        return contextlib.nullcontext()


class Checkpointer(Injector):
    def resume(self):
        return 0

    def step(self, *a, **k):
        pass

    def close(self):
        pass
