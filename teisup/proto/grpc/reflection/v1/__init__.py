"""Generated from protos/grpc/reflection/v1/ by tools/gen_protos.py."""
