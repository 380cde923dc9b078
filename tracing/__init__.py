"""The trace stage: run an MoE model over text and record what it does, layer by layer.

    tracing.TraceReader, TraceWriter       the trace format (tracing.trace_format), read and written
    tracing.TraceRecorder                  the hooks that record a model's routing
"""

from .recorder import TraceRecorder
from .trace_format import FIELDS, FORMAT_NAME, FORMAT_VERSION, estimate_trace_bytes, read_manifest
from .trace_reader import TraceReader
from .trace_writer import TraceWriter

__all__ = ["FIELDS", "FORMAT_NAME", "FORMAT_VERSION", "TraceReader", "TraceRecorder", "TraceWriter",
           "estimate_trace_bytes", "read_manifest"]
