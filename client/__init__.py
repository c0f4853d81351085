"""Python client for the bitnet.v1 gRPC API. Depends only on the generated stubs, never on the server."""
