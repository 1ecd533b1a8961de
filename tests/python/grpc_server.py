"""A real grpcio server for the proxy's gRPC tests.

It serves `test.Echo` with generic byte handlers, so no generated code is
needed: unary (with a trailer), server-streaming, client-streaming,
bidirectional streaming and a call that fails with NOT_FOUND.
"""

from concurrent import futures

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-trailer", "kept"),))
    return b"echo:" + request


def server_stream(request, context):
    for i in range(int(request.decode() or "3")):
        yield f"item-{i}".encode()


def client_stream(requests, context):
    return b"+".join(requests)


def bidi(requests, context):
    for request in requests:
        yield b"bidi:" + request


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())


def main():
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"grpc-server listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
