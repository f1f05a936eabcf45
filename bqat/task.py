"""Tasks: what `bqat.engine.fit` trains and `bqat.engine.evaluate` scores.

A task is an nn.Module with `training_step(x, y) -> (loss, logs)`, `evaluate(x) ->
{name: logits}` and a `progress` attribute (fraction of training done, set by the
engine). Two tasks exist: `bqat.BlockReplacement` trains the twin, `PartnerTask` below
trains (or scores) the FP partner on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PartnerTask(nn.Module):
    """Plain supervised training of one model (the FP partner's recipe): cross-entropy on its
    logits; `evaluate` names them 'fp'."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.progress = 0.0

    def forward(self, x):
        return self.model(x)

    def training_step(self, x, y):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": loss.detach(), "acc/fp": (logits.argmax(1) == y).float().mean().detach()}

    @torch.no_grad()
    def evaluate(self, x):
        return {"fp": self.model(x)}
