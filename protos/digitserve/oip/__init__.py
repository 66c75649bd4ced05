"""Generated code of the Open Inference Protocol (KServe V2) gRPC API, package ``inference``."""
