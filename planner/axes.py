"""The one vocabulary for mesh axes."""

from __future__ import annotations

from enum import Enum


class Axis(str, Enum):
    """Mesh axes, in the names megacpp uses everywhere ("dim" is reserved for tensor dimensions).

    A member is its name as a string ("tp"), so it keys dicts, names Layout fields and writes
    to JSON exactly as the plain name does.
    """

    TP = "tp"
    PP = "pp"
    VPP = "vpp"
    CP = "cp"
    EP = "ep"
    ETP = "etp"
    DP = "dp"
    EDP = "edp"
    # Sequence parallelism has no group of its own: it splits the activations around TP regions
    # along the sequence, over TP's ranks (DESIGN.md, the split taxonomy).
    SP = "sp"

    def __str__(self) -> str:
        return self.value


# Megatron's rank order, fastest-varying first (parallel_state.initialize_model_parallel
# order="tp-cp-ep-dp-pp", megatron/core/parallel_state.py:562 in core_v0.16.1).
MEGATRON_RANK_ORDER = (Axis.TP, Axis.CP, Axis.EP, Axis.DP, Axis.PP)
