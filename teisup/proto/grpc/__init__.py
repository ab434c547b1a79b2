"""Generated from protos/grpc/ by tools/gen_protos.py."""
