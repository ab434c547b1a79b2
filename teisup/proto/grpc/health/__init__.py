"""Generated from protos/grpc/health/ by tools/gen_protos.py."""
