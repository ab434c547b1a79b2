"""Generated from protos/grpc/reflection/ by tools/gen_protos.py."""
