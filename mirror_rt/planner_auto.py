"""AutoPlanner (first version: the config's plan at every step; the measured search follows)."""
from __future__ import annotations

from mirror_rt.planner import FixedPlanner


class AutoPlanner(FixedPlanner):
    def __init__(self, config, placement=None):
        super().__init__(config)
        self.placement = placement
