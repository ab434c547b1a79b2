"""Generated from protos/grpc/health/v1/ by tools/gen_protos.py."""
