"""A real grpcio server with the standard health service (grpcio-health-checking).

It listens on $PORT (as the agent gives it) and reports NOT_SERVING until
the file named by its argument exists, then SERVING: a test flips its
health from outside.
"""

import os
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main():
    flag = sys.argv[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    status = health.HealthServicer()
    status.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    server.add_insecure_port(f"127.0.0.1:{os.environ['PORT']}")
    server.start()

    def watch():
        # Bounded: an hour at most, as everything a test starts.
        for _ in range(36000):
            if os.path.exists(flag):
                status.set("", health_pb2.HealthCheckResponse.SERVING)
                return
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()
    print("grpc-health-server started", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
