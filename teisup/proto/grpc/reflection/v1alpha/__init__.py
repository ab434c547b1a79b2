"""Generated from protos/grpc/reflection/v1alpha/ by tools/gen_protos.py."""
