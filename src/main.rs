//! The `licensd` binary: parses the command line and runs a command
//! (everything lives in the library, see `licensd::cli`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    licensd::cli::main().await
}
