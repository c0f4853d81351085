"""Everything that runs in the server process: model files, tokenizer, engine, scheduler and gRPC service."""
