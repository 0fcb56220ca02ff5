"""What every pdserve gRPC service shares (torch-free): the server lifecycle with health,
reflection, metrics and graceful stop, and the conversions between protobuf and dataclasses."""
