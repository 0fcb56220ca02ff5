"""The router: the client-facing gRPC service, node choice, retries."""
