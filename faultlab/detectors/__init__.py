"""Step-level anomaly detectors behind one interface (framework-free logic)."""

from .base import Detector, DetectorSuite, Verdict, default_suite
from .builtin import ABFTDetector, HistoryBound, NonFinite, ReplicaDivergence, Spike
from .signals import Signals, SignalSpec

__all__ = ["Detector", "DetectorSuite", "Verdict", "default_suite", "ABFTDetector",
           "HistoryBound", "NonFinite", "ReplicaDivergence", "Spike", "Signals", "SignalSpec"]
