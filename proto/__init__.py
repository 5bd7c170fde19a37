"""The messages and services every part of Shoal speaks (generated from the .proto files here)."""

# Options of a client channel to the control API: the lists of a large cluster are larger than gRPC's
# default 4 MB answer (30,000 tasks are 9 MB, 5,000 nodes 4 MB).
CONTROL_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 1 << 30)]
