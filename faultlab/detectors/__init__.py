"""Step-level anomaly detectors behind one interface (framework-free logic)."""

from faultlab.detectors.base import Detector, DetectorSuite, Verdict
from faultlab.detectors.builtin import (ABFTDetector, HistoryBound, NonFinite, ReplicaDivergence,
                                       Spike, default_suite)
from faultlab.detectors.signals import Signals, SignalSpec

__all__ = ["Detector", "DetectorSuite", "Verdict", "default_suite", "ABFTDetector",
           "HistoryBound", "NonFinite", "ReplicaDivergence", "Spike", "Signals", "SignalSpec"]
