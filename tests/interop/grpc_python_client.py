#!/usr/bin/env python3
"""Interop check: an independent gRPC implementation (Python grpcio) subscribes to workerpush.

Starts the real binary (`serve --dev`, every port 0) in a temp dir, generates stubs from
proto/control_plane.proto, subscribes over mutual TLS with the dev client certificate, uploads
a worker through the upload server exactly as the README does, and checks the PUT it receives:
name, version, and SHA-256 of the code equal to `checksum`. Exits non-zero on any failure.

Usage: grpc_python_client.py path/to/workerpush
"""

import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_server(binary, workdir, extra=()):
    """Starts `serve --dev` with every port 0 (plus `extra` flags); returns it and its addresses."""
    proc = subprocess.Popen(
        [binary, "serve", "--dev", "--bind", "127.0.0.1", "--grpc-port", "0", "--quic-port", "0",
         "--http-port", "0", "--upload-port", "0", "--data-dir", "data", "--certs-dir", "certs",
         *extra],
        cwd=workdir, stdout=subprocess.PIPE, text=True,
        env={"PATH": os.environ.get("PATH", ""), "RUST_LOG": "warn"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    addrs = {}
    while True:
        line = lines.get(timeout=60).strip()
        if line == "workerpush: ready":
            return proc, addrs
        if line.startswith("workerpush: ") and " listening on " in line:
            name, rest = line[len("workerpush: "):].split(" listening on ", 1)
            addrs[name] = rest.split()[0]


def stubs(tmp):
    out = os.path.join(tmp, "gen")
    os.makedirs(out)
    code = protoc.main(["protoc", f"-I{ROOT}/proto", f"--python_out={out}", f"--grpc_python_out={out}",
                        f"{ROOT}/proto/control_plane.proto"])
    if code != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out)
    import control_plane_pb2
    import control_plane_pb2_grpc
    return control_plane_pb2, control_plane_pb2_grpc


def upload(addr, token, name, version, code):
    boundary = uuid.uuid4().hex
    parts = []
    for field, value, filename in (("filename", name.encode(), None), ("version", version.encode(), None),
                                   ("file", code, "worker.js")):
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://{addr}/upload", data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert 200 <= response.status < 300, response.status


def main():
    binary = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        proc, addrs = start_server(binary, tmp)
        try:
            pb, rpc = stubs(tmp)
            certs = os.path.join(tmp, "certs")
            read = lambda p: open(os.path.join(certs, p), "rb").read()
            secrets = dict(l.strip().split("=", 1) for l in open(os.path.join(certs, "dev-secrets.env")))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read("ca.pem"), private_key=read("clients/consumer-1-key.pem"),
                certificate_chain=read("clients/consumer-1.pem"))
            port = addrs["grpc"].rsplit(":", 1)[1]
            channel = grpc.secure_channel(f"localhost:{port}", credentials)
            stub = rpc.ControlPlaneStub(channel)
            updates = stub.SubscribeWorkerUpdates(pb.SubscribeRequest(worker_names=["py-worker"]), timeout=60)
            first = [next(updates), next(updates)]
            assert [u.kind for u in first] == [pb.UPDATE_KIND_RESET, pb.UPDATE_KIND_SYNCED], first
            code = b"export default { fetch() { return new Response('hi from python interop') } }"
            upload(addrs["upload"], secrets["UPLOAD_TOKEN"], "py-worker", "1.0.0", code)
            put = next(updates)
            assert put.kind == pb.UPDATE_KIND_PUT, put
            assert (put.worker_name, put.version) == ("py-worker", "1.0.0"), put
            assert put.worker_code == code
            assert hashlib.sha256(put.worker_code).hexdigest() == put.checksum
            assert put.size == len(code) and put.epoch == first[0].epoch and put.revision == 1
            listing = stub.ListWorkers(pb.ListWorkersRequest(), timeout=10)
            assert [w.worker_name for w in listing.workers] == ["py-worker"] and listing.revision == 1
            # Acks on one StreamAcks call: one answer per batch, and they show in propagation.
            ack = pb.AckRequest(worker_name="py-worker", revision=put.revision, applied=True)
            batches = [pb.AckBatch(acks=[ack]), pb.AckBatch(acks=[ack, ack])]
            answers = list(stub.StreamAcks(iter(batches), timeout=10))
            assert len(answers) == 2, answers
            request = urllib.request.Request(f"http://{addrs['http']}/v1/workers/py-worker",
                                             headers={"Authorization": f"Bearer {secrets['UPLOAD_TOKEN']}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                propagation = json.load(response)["propagation"]
            assert propagation["state"] == "complete", propagation
            assert [a["consumer_id"] for a in propagation["acked"]] == ["consumer-1"], propagation
            # Another identity's consumer id ends that call with PERMISSION_DENIED.
            try:
                list(stub.StreamAcks(iter([pb.AckBatch(acks=[pb.AckRequest(
                    consumer_id="consumer-2", worker_name="py-worker", revision=put.revision)])]), timeout=10))
                raise AssertionError("an ack for another identity must be refused")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
            updates.cancel()
            print("interop: 1 passed, 0 failed")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
