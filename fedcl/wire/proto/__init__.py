"""Wire format of the queue service: queue.proto and its committed generated stubs.

Import the stubs explicitly (``from fedcl.wire.proto import queue_pb2``); ``queue_pb2_grpc``
needs grpc and is imported only by server/ and client/.
"""
