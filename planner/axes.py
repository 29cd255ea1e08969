"""The one vocabulary for mesh axes."""

from __future__ import annotations

from enum import Enum


class Axis(str, Enum):
    """Mesh axes, in the names megacpp uses everywhere ("dim" is reserved for tensor dimensions)."""

    TP = "tp"
    PP = "pp"
    VPP = "vpp"
    CP = "cp"
    EP = "ep"
    ETP = "etp"
    DP = "dp"
    EDP = "edp"


# Megatron's rank order, fastest-varying first (parallel_state.initialize_model_parallel
# order="tp-cp-ep-dp-pp", megatron/core/parallel_state.py:562 in core_v0.16.1).
MEGATRON_RANK_ORDER = ("tp", "cp", "ep", "dp", "pp")
