//! The `licensd` binary: parses the command line and runs a command
//! (everything lives in the library, see `licensd::cli`).

/// mimalloc, not the C library's allocator: a call allocates and frees
/// dozens of small buffers across Tokio's worker threads (HTTP/2 frames,
/// protobuf messages, statements' rows), and glibc's malloc spent 15–20 %
/// of the server's CPU on them (`perf`, during `licensd bench`), mimalloc
/// much less (README, Performance). It builds from one C file in seconds,
/// which is why it and not jemalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    licensd::cli::main().await
}
