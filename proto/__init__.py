"""Generated protobuf and gRPC modules for cluster_agent.proto (see generate.py)."""
