"""Multi-process data-parallel training for faultlab's campaigns: one process per rank under
torch.distributed (gloo on CPU, NCCL where a GPU is), started and restarted by
torch.distributed.elastic, with Gemini-style snapshots in peers' host memory
(faultlab.distributed) and the PCcheck engine underneath. See docs/distributed.md.

Modules: ``trainer`` (RankTrainer: DDP, rank-targeted faults, one collective per step),
``peers`` (the rank's snapshots in host memory, their replication to peers, fetches at
recovery), ``worker`` (a rank's entry point: recovery, the step loop, process faults),
``launch`` (the elastic agent on loopback; results of a job)."""
