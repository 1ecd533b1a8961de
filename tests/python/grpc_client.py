"""A real grpcio client: calls `test.Echo` through a proxy address and
prints what arrived as JSON, for the Rust test to check.

usage: grpc_client.py PROXY_ADDR AUTHORITY
"""

import json
import sys

import grpc


def main():
    target, authority = sys.argv[1], sys.argv[2]
    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0)]
    result = {}
    with grpc.insecure_channel(target, options=options) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        reply, call = unary.with_call(b"hello", timeout=10)
        result["unary"] = reply.decode()
        result["unary_trailers"] = {k: v for k, v in call.trailing_metadata()}
        stream = channel.unary_stream("/test.Echo/ServerStream")
        result["server_stream"] = [m.decode() for m in stream(b"5", timeout=10)]
        client_stream = channel.stream_unary("/test.Echo/ClientStream")
        result["client_stream"] = client_stream(iter([b"a", b"b", b"c"]), timeout=10).decode()
        bidi = channel.stream_stream("/test.Echo/Bidi")
        result["bidi"] = [m.decode() for m in bidi(iter([b"x", b"y"]), timeout=10)]
        fail = channel.unary_unary("/test.Echo/Fail")
        try:
            fail(b"gizmo", timeout=10)
            result["fail"] = "no error"
        except grpc.RpcError as error:
            result["fail"] = {"code": error.code().name, "details": error.details()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
