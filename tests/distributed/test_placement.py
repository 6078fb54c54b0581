"""Gemini placement of in-memory snapshot copies: properties over random cluster shapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from faultlab.distributed import (PlacementError, holders_of, node_count, node_of, peers,
                                  senders_to)
from faultlab.errors import FaultlabError

cluster = st.integers(1, 6).flatmap(lambda rpn: st.tuples(
    st.integers(1, 24), st.just(rpn), st.integers(0, 30)))


@settings(max_examples=150, deadline=None)
@given(cluster, st.data())
def test_peers_properties(shape, data):
    world, rpn, m = shape
    rank = data.draw(st.integers(0, world - 1))
    p = peers(rank, world, rpn, m)
    assert p == holders_of(rank, world, rpn, m)
    assert len(p) == min(m, world - 1) and len(set(p)) == len(p)
    assert rank not in p and all(0 <= r < world for r in p)
    own = node_of(rank, rpn)
    same = [node_of(r, rpn) == own for r in p]
    assert same == sorted(same), "a same-node holder before another node's"
    # as many distinct other nodes as there can be, before any node gets a second copy
    others = [node_of(r, rpn) for r in p if node_of(r, rpn) != own]
    n_other = node_count(world, rpn) - 1
    first = others[:n_other]
    assert len(set(first)) == len(first)
    # a prefix of the full order: more copies never move the first ones
    assert peers(rank, world, rpn, m + 1)[:len(p)] == p
    assert p == peers(rank, world, rpn, m)                       # deterministic


@settings(max_examples=100, deadline=None)
@given(cluster)
def test_senders_to_is_the_inverse_of_peers(shape):
    world, rpn, m = shape
    held = {r: set() for r in range(world)}
    for owner in range(world):
        for h in peers(owner, world, rpn, m):
            held[h].add(owner)
    for r in range(world):
        assert senders_to(r, world, rpn, m) == sorted(held[r])


def test_examples():
    # 4 nodes of 2: same local index on the following nodes first, then the other index
    assert peers(0, 8, 2, 3) == [2, 4, 6]
    assert peers(3, 8, 2, 4) == [5, 7, 1, 4]
    assert peers(3, 8, 2, 7) == [5, 7, 1, 4, 6, 0, 2]
    assert peers(0, 2, 2, 5) == [1]                          # one node: its other rank
    assert peers(0, 1, 1, 3) == []
    assert peers(4, 5, 2, 2) == [0, 2]                       # the partial last node
    assert peers(1, 5, 2, 4) == [3, 4, 2, 0]      # node 2 lacks local 1: gives its local 0
    assert peers(2, 8, 2, 0) == [] and senders_to(2, 8, 2, 0) == []
    assert senders_to(2, 8, 2, 1) == [0]
    assert node_of(5, 2) == 2 and node_count(5, 2) == 3


@pytest.mark.parametrize("call", [
    lambda: peers(0, 4, 2, -1), lambda: peers(4, 4, 2, 1), lambda: peers(-1, 4, 2, 1),
    lambda: peers(0, 0, 2, 1), lambda: peers(0, 4, 0, 1), lambda: peers(0, 4, 2, 1.5),
    lambda: node_of(1, 0), lambda: node_of(-1, 2), lambda: senders_to(9, 4, 2, 1),
    lambda: peers(True, 4, 2, 1),
])
def test_bad_arguments(call):
    with pytest.raises(PlacementError) as e:
        call()
    assert isinstance(e.value, FaultlabError) and isinstance(e.value, ValueError)
