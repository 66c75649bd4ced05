"""The digit-serving API: generated gRPC code (``digitserve.v1``) and the framework-free pieces
that the trainer, the server and the client share (IDX files, metrics, the model repository)."""
