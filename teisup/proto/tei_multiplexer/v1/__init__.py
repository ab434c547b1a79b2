"""Generated from protos/tei_multiplexer/v1/ by tools/gen_protos.py."""
