"""Simulation: the only layer that imports both the server and the client."""
