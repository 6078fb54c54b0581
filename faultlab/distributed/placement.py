"""Where each rank's in-memory snapshot is replicated (Gemini's placement), pure functions.

Ranks are grouped into logical nodes of `ranks_per_node` consecutive ranks (the last node may
be partial); node n holds ranks n*rpn .. n*rpn+rpn-1. The holders of `rank`'s copies (rank
r on node n with local index l, N nodes) are the first m of this order:

1. ranks on OTHER nodes, round-robin over the following nodes n+1, n+2, ... (mod N): in
   round 0 each of them gives its rank of local index l (the same local index), in round 1
   its next one (l+1 mod rpn), and so on; a rank past the end of the partial last node is
   skipped, that node giving its next existing rank instead, so every round visits every
   node that has ranks left;
2. then the other ranks of r's own node: local index l+1, l+2, ... (mod rpn).

So a copy lives on another node whenever there is one, the first copies go to distinct
nodes (as many as there are other nodes), and every rank but r appears exactly once in the
full order. m is capped at world - 1; m < 0 is an error.
"""

from __future__ import annotations

from collections.abc import Iterator

from faultlab.errors import FaultlabError


class PlacementError(FaultlabError, ValueError):
    """A rank, world size, node size or replica count out of range."""


def _check(rank: int, world: int, ranks_per_node: int) -> None:
    for name, v, lo in (("world", world, 1), ("ranks_per_node", ranks_per_node, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise PlacementError(f"placement: {name} {v!r} is not an integer >= {lo}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise PlacementError(f"placement: rank {rank!r} is not from 0 to {world - 1}")


def node_of(rank: int, ranks_per_node: int) -> int:
    """The logical node of `rank`."""
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) \
            or ranks_per_node < 1:
        raise PlacementError(f"placement: ranks_per_node {ranks_per_node!r} is not an "
                             "integer >= 1")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise PlacementError(f"placement: rank {rank!r} is not an integer >= 0")
    return rank // ranks_per_node


def node_count(world: int, ranks_per_node: int) -> int:
    _check(0, world, ranks_per_node)
    return -(-world // ranks_per_node)


def _order(rank: int, world: int, rpn: int) -> Iterator[int]:
    nodes = -(-world // rpn)
    node, local = divmod(rank, rpn)
    # each following node's ranks, starting at the same local index (mod rpn, absent skipped)
    queues = []
    for k in range(1, nodes):
        other = (node + k) % nodes
        queues.append([r for r in (other * rpn + (local + j) % rpn for j in range(rpn))
                       if r < world])
    for j in range(rpn):                        # round j: each node's next rank, in turn
        for q in queues:
            if j < len(q):
                yield q[j]
    for j in range(1, rpn):
        r = node * rpn + (local + j) % rpn
        if r < world:
            yield r


def peers(rank: int, world: int, ranks_per_node: int, m: int) -> list[int]:
    """The ranks that hold copies of `rank`'s snapshot, in placement order (see the module
    docstring): min(m, world - 1) distinct ranks, never `rank` itself."""
    _check(rank, world, ranks_per_node)
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise PlacementError(f"placement: m {m!r} is not an integer >= 0")
    m = min(m, world - 1)
    out = []
    if m:
        for r in _order(rank, world, ranks_per_node):
            out.append(r)
            if len(out) == m:
                break
    return out


def holders_of(owner: int, world: int, ranks_per_node: int, m: int) -> list[int]:
    """The ranks that hold copies of `owner`'s snapshot (the same list as peers)."""
    return peers(owner, world, ranks_per_node, m)


def senders_to(rank: int, world: int, ranks_per_node: int, m: int) -> list[int]:
    """The owners whose copies `rank` holds (whom it receives from), ascending: the inverse
    of peers."""
    _check(rank, world, ranks_per_node)
    return [o for o in range(world) if o != rank and rank in peers(o, world, ranks_per_node, m)]
