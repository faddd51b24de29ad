"""A backbone plus a learned schedule's parameters in one parameter tree."""

from __future__ import annotations

import flax.linen as nn


class ScheduledModel(nn.Module):
  """The backbone plus the schedule's parameters in ONE params pytree.

  The backbone's parameters stay at the top level (``params["embed"]``, ...,
  exactly as without a learned schedule); the schedule's live under
  ``params["schedule"]``, so the optimizer, EMA, sharding and checkpoints carry
  them.  Calling it runs the backbone only.
  """
  net: nn.Module
  schedule: nn.Module

  def setup(self):
    nn.share_scope(self, self.net)

  def __call__(self, digits, t, train: bool = False, **kwargs):
    if self.is_initializing():
      self.schedule(digits.shape[1])
    return self.net(digits, t, train=train, **kwargs)

  @nn.nowrap
  def head_logits(self, params, x, padded: bool = True):
    """The backbone's output head on features (its parameters are at the top level)."""
    return self.net.head_logits(params, x, padded)


def attach_schedule(model: nn.Module, schedule) -> nn.Module:
  """The model whose params also hold ``schedule``'s parameters (itself when it has none)."""
  module = schedule.param_module()
  if module is None:
    return model
  return ScheduledModel(net=model, schedule=module)
