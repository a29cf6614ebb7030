"""CR types and validation, sources, the object store, the offload state machine."""
