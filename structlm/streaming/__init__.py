"""Streaming mode: prune a checkpoint that does not fit in memory, one decoder layer at a time.

    from structlm.streaming import stream_prune
    result = stream_prune("big-model/", "out/pruned", method="flap", target="params=0.8", calib=ids)

Memory is bounded by the embeddings, one decoder layer and the calibration activations; see
docs/scale.md for the memory model, the methods that stream and why the others cannot.
Modules: :mod:`.checkpoint` (the meta skeleton, tensors read one by one), :mod:`.methods` (the
methods' streaming steps and the refusals), :mod:`.run` (the two passes and the sharded output).
"""

from .checkpoint import StreamError, StreamingCheckpoint, checkpoint_files, resident_layers
from .methods import REFUSED, SUPPORTED
from .run import StreamResult, stream_prune

__all__ = ["StreamError", "StreamingCheckpoint", "checkpoint_files", "resident_layers", "REFUSED", "SUPPORTED",
           "StreamResult", "stream_prune"]
