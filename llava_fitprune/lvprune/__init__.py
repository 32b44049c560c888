"""LVPruning: language-guided vision-token pruning with small trained modules on a frozen LLaVA."""
from .modules import LVPruneConfig, LVPruneModule, LVPruneModules
from .selector import LVPruneSelector, attach, detach

__all__ = ["LVPruneConfig", "LVPruneModule", "LVPruneModules", "LVPruneSelector", "attach", "detach"]
