"""Generated from protos/tei/v1/ by tools/gen_protos.py."""
