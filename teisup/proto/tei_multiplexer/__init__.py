"""Generated from protos/tei_multiplexer/ by tools/gen_protos.py."""
