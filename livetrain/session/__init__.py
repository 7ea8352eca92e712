"""The training session: optimizer + guarded step + checkpoint sync on one model
directory, with no transport (the worker serves it over ZMQ; `offline` runs it in-process)."""

from livetrain.session.probe import ProbeGuard
from livetrain.session.training_session import StepReport, TrainingSession, build_optimizer, load_model

__all__ = ["ProbeGuard", "StepReport", "TrainingSession", "build_optimizer", "load_model"]
