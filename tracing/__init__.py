"""The trace stage: run an MoE model over text and record what it does, layer by layer.

    tracing.run_trace(TraceConfig)         what `trace` does (settings: tracing.config, configs/trace.yaml)
    tracing.TraceReader, TraceWriter       the trace format (tracing.trace_format), read and written
    tracing.TraceRecorder                  the hooks that record a model's routing
"""

from .config import TraceConfig, load_trace_config
from .recorder import TraceRecorder
from .trace_format import FIELDS, FORMAT_NAME, FORMAT_VERSION, estimate_trace_bytes, read_manifest
from .trace_reader import TraceReader
from .trace_writer import TraceWriter
from .cli import run_trace  # noqa: E402 - after the names it uses

__all__ = ["FIELDS", "FORMAT_NAME", "FORMAT_VERSION", "TraceConfig", "TraceReader", "TraceRecorder", "TraceWriter",
           "estimate_trace_bytes", "load_trace_config", "read_manifest", "run_trace"]
