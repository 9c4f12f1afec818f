"""The dependency graph of prunable coupled units (see docs/graph.md)."""

from .builder import GraphBuildError, build_graph, param_shapes
from .mask import mask_units
from .model import (ATTENTION, BLOCK, CHANNEL_KINDS, FFN, FFN_CHANNEL, HIDDEN_CHANNEL, KINDS, KV_GROUP,
                    QK_CHANNEL, QUERY_HEAD, SUBLAYER_KINDS, V_CHANNEL, Graph, Group, Member, Unit)

__all__ = ["build_graph", "mask_units", "param_shapes", "GraphBuildError", "Graph", "Group", "Member", "Unit",
           "KINDS", "SUBLAYER_KINDS", "QUERY_HEAD", "KV_GROUP", "FFN_CHANNEL", "HIDDEN_CHANNEL", "ATTENTION",
           "FFN", "BLOCK", "QK_CHANNEL", "V_CHANNEL", "CHANNEL_KINDS"]
