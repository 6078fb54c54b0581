"""faultlab: hardware-style fault injection, detection and recovery for DL training."""

__version__ = "0.1.0"
