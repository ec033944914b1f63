//! The `licensd` binary: parses the command line and runs a command
//! (everything lives in the library, see `licensd::cli`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    match licensd::cli::run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "licensd failed");
            eprintln!("licensd: {e}");
            ExitCode::FAILURE
        }
    }
}
