"""Generated protobuf modules for package ``wharf.v1`` (see ``wharf.proto`` build script)."""
