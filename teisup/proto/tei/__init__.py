"""Generated from protos/tei/ by tools/gen_protos.py."""
