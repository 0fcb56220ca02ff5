"""Optional OpenTelemetry traces: with `--otlp-endpoint` a process sends its spans to an
OTLP/gRPC collector; without it nothing of OpenTelemetry is imported and every call here is a
no-op. One request is one trace: the gateway's span (or the router's, for a gRPC client), the
router's, the prefill node's, its KV transfer's and the decode node's, each a child of the
hop that called it. The context travels in the W3C `traceparent` header: HTTP headers into the
gateway, gRPC metadata between components.

Spans are started and ended explicitly, never made "current": a handler's span lives across
the yields of an async generator, where a context variable set on one resume is not the one
seen on the next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)


class NoSpan:
    """What `start` returns with tracing off."""

    def set_attribute(self, key: str, value) -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN = NoSpan()


class Tracing:
    def __init__(self, service_name: str, otlp_endpoint: str | None = None):
        """Off without an endpoint. `service_name`: what the spans say sent them (pdserve-router)."""
        self.enabled = bool(otlp_endpoint)
        if not self.enabled:
            return
        from opentelemetry import propagate, trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._trace, self._propagate = trace, propagate
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=not otlp_endpoint.startswith("https://"))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("pdserve")
        log.info("tracing to %s as %s", otlp_endpoint, service_name)

    def start(self, name: str, carrier: Iterable | Mapping | None = None, parent=None, **attributes):
        """A span named `name`: the child of `parent` (a span of ours), else of the context in
        `carrier` (incoming gRPC metadata pairs or HTTP headers), else a new trace's root."""
        if not self.enabled:
            return NO_SPAN
        if parent is not None:
            context = self._trace.set_span_in_context(parent)
        else:
            pairs = carrier.items() if hasattr(carrier, "items") else carrier or ()
            context = self._propagate.extract({str(k).lower(): str(v) for k, v in pairs})
        return self.tracer.start_span(name, context=context, attributes=attributes)

    def metadata(self, span) -> tuple:
        """The gRPC metadata that makes the callee's span a child of `span`."""
        if not self.enabled or span is NO_SPAN:
            return ()
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier, context=self._trace.set_span_in_context(span))
        return tuple(carrier.items())

    def close(self) -> None:
        """Sends what is still buffered."""
        if self.enabled:
            self.provider.shutdown()
