"""The wire: gRPC stubs of the queue service, its client, and the round protocol (record keys,
config sections, error codes) shared by server and client."""
