"""Generated protobuf messages and purerpc stubs for teisup's wire contracts.

Everything under this package is written by tools/gen_protos.py from
protos/; edit the .proto files and regenerate, never these modules.
"""
