"""The training HTTP surface (a FastAPI router), mounted on vLLM's API server."""

from livetrain.routes.router import STATE_ATTRIBUTE, TrainingRoutes, WeightsChangedHook, router

__all__ = ["STATE_ATTRIBUTE", "TrainingRoutes", "WeightsChangedHook", "router"]
