"""Generated protobuf/gRPC modules (tools/genproto.py); do not edit."""
