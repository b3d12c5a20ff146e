#!/usr/bin/env python3
"""Interop check: stock Python clients for gRPC server reflection and health against workerpush.

Starts the real binary (`serve --dev`, every port 0, `--grace 10s`) in a temp dir and, over mutual
TLS with the dev client certificate:
- lists the services with grpcio-reflection's own client (it speaks `grpc.reflection.v1alpha`) and
  resolves `controlplane.v1.ControlPlane`, its seven methods and their message types through a
  descriptor pool fed by reflection alone (no local .proto);
- lists them again over `grpc.reflection.v1` (the same messages under another package name);
- `grpc.health.v1.Health/Check` answers SERVING for "" and for the service, NOT_FOUND for others;
- `Health/Watch` says SERVING; on SIGTERM it says NOT_SERVING and ends with UNAVAILABLE, and the
  process exits 0 well inside its grace period (a watcher must not hold the drain).
Exits non-zero on any failure.

Usage: grpc_python_health_reflection.py path/to/workerpush
"""

import os
import signal
import sys
import tempfile
import time

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from grpc_python_client import start_server

SERVICE = "controlplane.v1.ControlPlane"
METHODS = {
    # name: (input, output, client streaming, server streaming)
    "SubscribeWorkerUpdates": ("SubscribeRequest", "WorkerUpdate", False, True),
    "RegisterConsumer": ("RegisterRequest", "RegisterResponse", False, False),
    "DeregisterConsumer": ("DeregisterRequest", "DeregisterResponse", False, False),
    "AckUpdate": ("AckRequest", "AckResponse", False, False),
    "FetchWorker": ("FetchWorkerRequest", "WorkerChunk", False, True),
    "ListWorkers": ("ListWorkersRequest", "ListWorkersResponse", False, False),
    "StreamAcks": ("AckBatch", "AckResponse", True, True),
}
GRACE_SECONDS = 10


def secure_channel(certs, grpc_addr):
    read = lambda p: open(os.path.join(certs, p), "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"), private_key=read("clients/consumer-1-key.pem"),
        certificate_chain=read("clients/consumer-1.pem"))
    port = grpc_addr.rsplit(":", 1)[1]
    return grpc.secure_channel(f"localhost:{port}", credentials)


def check_reflection_v1alpha(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    expected = {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"}
    assert expected <= services, services
    service = DescriptorPool(database).FindServiceByName(SERVICE)
    found = {}
    for method in service.methods:
        assert method.input_type.full_name.startswith("controlplane.v1."), method.input_type.full_name
        found[method.name] = (method.input_type.name, method.output_type.name,
                              method.client_streaming, method.server_streaming)
    assert found == METHODS, found
    return services


def check_reflection_v1(channel):
    # v1 and v1alpha share their messages field for field; only the package differs.
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                     reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)])
    responses = list(call(requests, timeout=10))
    assert len(responses) == 2, responses
    names = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE in names, names
    assert responses[1].file_descriptor_response.file_descriptor_proto, responses[1]


def check_health(channel):
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", SERVICE):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == serving, (name, answer)
    try:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        raise AssertionError("an unknown service must be NOT_FOUND")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error


def check_watch_ends_on_sigterm(channel, proc):
    health = health_pb2_grpc.HealthStub(channel)
    updates = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
    assert next(updates).status == health_pb2.HealthCheckResponse.SERVING
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert next(updates).status == health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        extra = next(updates)
        raise AssertionError(f"the watch went on after NOT_SERVING: {extra}")
    except StopIteration:
        pass
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    code = proc.wait(timeout=GRACE_SECONDS + 5)
    took = time.monotonic() - started
    assert code == 0, code
    assert took < GRACE_SECONDS / 2, f"drain took {took:.1f} s of a {GRACE_SECONDS} s grace"
    return took


def main():
    binary = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        proc, addrs = start_server(binary, tmp, ["--grace", f"{GRACE_SECONDS}s"])
        try:
            channel = secure_channel(os.path.join(tmp, "certs"), addrs["grpc"])
            services = check_reflection_v1alpha(channel)
            print(f"reflection v1alpha: {sorted(services)}")
            check_reflection_v1(channel)
            check_health(channel)
            took = check_watch_ends_on_sigterm(channel, proc)
            print(f"drain with a health watcher: exit 0 in {took:.2f} s")
            print("interop: 4 passed, 0 failed")
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
