//! Generates the protobuf messages and the gRPC client from `proto/control_plane.proto` with
//! `protox` (no system `protoc`), writes the descriptor set for server reflection, and generates
//! the gRPC server by hand-described methods so that `SubscribeWorkerUpdates` can stream updates
//! that were encoded once for every subscriber. Also names the commit being built
//! (`WORKERPUSH_COMMIT`) for `--version` and `workerpush_build_info`.

use std::{env, path::PathBuf, process::Command};

use tonic_build::manual::{Builder, Method, Service};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rustc-env=WORKERPUSH_COMMIT={}", commit());
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
            "deregister_consumer",
            "DeregisterConsumer",
            "DeregisterRequest",
            "DeregisterResponse",
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

/// The commit being built: `WORKERPUSH_COMMIT` if set (a Docker build has no `.git`), else
/// `git rev-parse --short=12 HEAD`, else `unknown`. Reruns when HEAD or its branch moves.
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=WORKERPUSH_COMMIT");
    if let Ok(commit) = env::var("WORKERPUSH_COMMIT")
        && !commit.trim().is_empty()
    {
        return commit.trim().to_owned();
    }
    let git = |args: &[&str]| -> Option<String> {
        let output = Command::new("git").args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // A worktree keeps HEAD in its own git dir and the branch in the common one.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    commit
}
