"""swarmd, the node daemon (`shoal.node.swarmd`)."""

import os

# swarmd starts child processes (its etcd member, conmon) while gRPC's threads run. gRPC's own
# fork handlers then run in a process whose other threads are inside gRPC, which can crash the
# parent's poller ("ev_epoll1_linux.cc ... Check failed"); children here exec at once and never
# use gRPC, so the handlers are not needed. Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
