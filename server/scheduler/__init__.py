"""The scheduler: which work goes into the engine next, and in which order (see its modules)."""

from llmserve.server.scheduler.fair_share import (
    FairShare,
    ServiceWeights,
    Tenant,
    jain_index,
)
from llmserve.server.scheduler.steps import Histogram, StepPlan, StepStats, plan_step

__all__ = [
    "FairShare",
    "Histogram",
    "ServiceWeights",
    "StepPlan",
    "StepStats",
    "Tenant",
    "jain_index",
    "plan_step",
]
