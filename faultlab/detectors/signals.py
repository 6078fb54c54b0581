"""The per-step signals detectors look at (framework-free, host-side scalars).

A trainer fills them with fused reductions on the device and one host transfer per step; which
optional signals it computes is said by a :class:`SignalSpec`, so an unprotected run pays
nothing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SignalSpec:
    history: bool = True    # per-layer |Adam first moment| (the artifact's bound)
    grads: bool = False     # the norm of the averaged gradient (spikes)
    bound: float = float("inf")  # exact max |m| is needed only above this (history bound)
    params: bool = False    # a norm of all parameters (non-finite state)
    replicas: bool = False  # per-replica weight checksums (replica divergence)
    abft: bool = False      # checksum residuals of linear / conv outputs


@dataclass(frozen=True)
class Signals:
    step: int
    loss: float
    replica_loss: list[float] = field(default_factory=list)
    grad_norm: float = 0.0
    m_max: dict[str, float] = field(default_factory=dict)  # per kernel: max |m|, or an upper
    #   bound of it (its L2 norm) when that is below SignalSpec.bound
    m_other: float = 0.0    # largest |m| norm of the other parameters (non-finite check)
    param_norm: float | None = None
    replica_checksums: list[float] | None = None
    abft_residual: float | None = None

    def to_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss, "replica_loss": self.replica_loss,
                "grad_norm": self.grad_norm, "m_max": self.m_max, "m_other": self.m_other,
                "param_norm": self.param_norm,
                "replica_checksums": self.replica_checksums, "abft_residual": self.abft_residual}

    @classmethod
    def from_dict(cls, d: dict) -> "Signals":
        return cls(**d)
