"""The gRPC model server: loads a published model version and serves Predict, Evaluate and
GetModelInfo, with health checking, reflection and graceful shutdown."""
