"""Clients for the rexnet service: HTTP, gRPC and bRPC, and the batch client on top of them."""
