"""The optimizer: APOLLO / APOLLO-Mini (AdamW-like training with SGD-sized state), its
parameter groups, stochastic rounding, and weight gradients kept as factors. Knows only torch."""

from livetrain.optim.apollo import Apollo, apollo_mini
from livetrain.optim.param_groups import apollo_param_groups
from livetrain.optim.stochastic_rounding import copy_stochastic_

__all__ = ["Apollo", "apollo_mini", "apollo_param_groups", "copy_stochastic_"]
