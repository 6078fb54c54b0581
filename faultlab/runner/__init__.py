"""Running a campaign: golden runs (``golden``), trials in a session (``session``) and the
worker pool that runs them in parallel (``pool``)."""

from faultlab.runner.session import DetectOptions, Session, trial_window, validate_trials

__all__ = ["DetectOptions", "Session", "trial_window", "validate_trials"]
