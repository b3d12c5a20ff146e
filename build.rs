//! Generates the protobuf messages and the gRPC client from `proto/control_plane.proto` with
//! `protox` (no system `protoc`), writes the descriptor set for server reflection, and generates
//! the gRPC server by hand-described methods so that `SubscribeWorkerUpdates` can stream updates
//! that were encoded once for every subscriber.

use std::{env, path::PathBuf};

use tonic_build::manual::{Builder, Method, Service};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(["proto/control_plane.proto"], ["proto"])?;
    std::fs::write(
        out_dir.join("control_plane_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .bytes(".controlplane.v1")
        .compile_fds(fds)?;

    let method = |name: &str, route: &str, input: &str, output: &str, streaming: bool| {
        let builder = Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("crate::pb::{input}"))
            .output_type(format!("crate::pb::{output}"))
            .codec_path(if streaming && output == "EncodedUpdate" {
                "crate::pb::UpdateCodec"
            } else {
                "tonic_prost::ProstCodec"
            });
        if streaming {
            builder.server_streaming().build()
        } else {
            builder.build()
        }
    };
    let service = Service::builder()
        .name("ControlPlane")
        .package("controlplane.v1")
        .method(method(
            "subscribe_worker_updates",
            "SubscribeWorkerUpdates",
            "SubscribeRequest",
            "EncodedUpdate",
            true,
        ))
        .method(method(
            "register_consumer",
            "RegisterConsumer",
            "RegisterRequest",
            "RegisterResponse",
            false,
        ))
        .method(method(
            "ack_update",
            "AckUpdate",
            "AckRequest",
            "AckResponse",
            false,
        ))
        .method(method(
            "fetch_worker",
            "FetchWorker",
            "FetchWorkerRequest",
            "WorkerChunk",
            true,
        ))
        .method(method(
            "list_workers",
            "ListWorkers",
            "ListWorkersRequest",
            "ListWorkersResponse",
            false,
        ))
        .method(
            Method::builder()
                .name("stream_acks")
                .route_name("StreamAcks")
                .input_type("crate::pb::AckBatch")
                .output_type("crate::pb::AckResponse")
                .codec_path("tonic_prost::ProstCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    Builder::new()
        .build_client(false)
        .out_dir(&out_dir)
        .compile(&[service]);
    Ok(())
}
