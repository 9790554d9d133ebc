"""The coordinator service: gRPC server, job scheduler, store and blob store."""
