"""The dependency graph of prunable coupled units (see docs/graph.md)."""

from .builder import GraphBuildError, build_graph, param_shapes
from .mask import mask_units
from .model import (ATTENTION, BLOCK, FFN, FFN_CHANNEL, HIDDEN_CHANNEL, KINDS, KV_GROUP, QUERY_HEAD,
                    SUBLAYER_KINDS, Graph, Group, Member, Unit)

__all__ = ["build_graph", "mask_units", "param_shapes", "GraphBuildError", "Graph", "Group", "Member", "Unit",
           "KINDS", "SUBLAYER_KINDS", "QUERY_HEAD", "KV_GROUP", "FFN_CHANNEL", "HIDDEN_CHANNEL", "ATTENTION",
           "FFN", "BLOCK"]
