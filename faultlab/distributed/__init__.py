"""In-memory checkpoints held in peers' host memory (Gemini-style), framework-free.

    store = SnapshotStore(default_root(job_id), node_of(rank, ranks_per_node))
    store.write(rank, step, arrays, meta, generation)           # own copy, in host memory
    blob = store.read_blob(rank, step)                         # sent to peers(rank, ...)
    store.put_blob(blob)                                       # on each peer
    ...                                                        # after a restart:
    plan = recovery_plan({h: inventory_from_json(t) for h, t in published.items()},
                         world, disk_steps)

The torch side (sending blobs, the training loop) lives in the torch backend; nothing here
imports a framework.
"""

from faultlab.distributed.agree import (DISK, MEMORY, SCRATCH, RecoveryPlan, complete_steps,
                                        inventory_from_json, inventory_to_json, recovery_plan)
from faultlab.distributed.placement import (PlacementError, holders_of, node_count, node_of,
                                            peers, senders_to)
from faultlab.distributed.snapshots import (HEADER_BYTES, MAGIC, PendingWrite, Snapshot,
                                            SnapshotError, SnapshotStore, decode_snapshot,
                                            default_root, encode_into, encode_snapshot,
                                            peek_header, snapshot_size, verify_snapshot)

__all__ = ["DISK", "HEADER_BYTES", "MAGIC", "MEMORY", "SCRATCH", "PendingWrite",
           "PlacementError", "RecoveryPlan", "Snapshot", "SnapshotError", "SnapshotStore",
           "complete_steps", "decode_snapshot", "default_root", "encode_into",
           "encode_snapshot", "holders_of", "inventory_from_json", "inventory_to_json",
           "node_count", "node_of", "peek_header", "peers", "recovery_plan", "senders_to",
           "snapshot_size", "verify_snapshot"]
