"""VRAM-aware placement: estimate what a model needs, decide where it runs, diff two plans.

Everything here is a pure function of its arguments (DESIGN.md rule 1).
"""

from placement.diff import NodeDiff, diff
from placement.estimate import Estimate, estimate
from placement.model import (
    OUT_OF_CAPACITY,
    TOO_FEW_NODES,
    TOO_LARGE,
    Assignment,
    Gpu,
    ModelSpec,
    Node,
    Plan,
    Unplaced,
)
from placement.solve import POLICIES, solve

__all__ = [
    "OUT_OF_CAPACITY",
    "POLICIES",
    "TOO_FEW_NODES",
    "TOO_LARGE",
    "Assignment",
    "Estimate",
    "Gpu",
    "ModelSpec",
    "Node",
    "NodeDiff",
    "Plan",
    "Unplaced",
    "diff",
    "estimate",
    "solve",
]
