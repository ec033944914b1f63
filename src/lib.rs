//! licensd — a gRPC licensing service: it issues license keys, binds them to
//! workstations up to the seat count, answers "is this license valid?", and
//! renews licenses with one-time renewal codes.
//!
//! The layout, from the inside out:
//!
//! * [`domain`] — the business rules R1–R11 as pure functions: keys and
//!   codes, products and their policy, a license's validity at an instant, and
//!   one decision function per operation. No I/O; time is a parameter.
//! * [`store`] — the [`store::Store`] trait and its SQL implementation for
//!   SQLite (embedded default) and PostgreSQL (many replicas). Every write is
//!   one transaction that loads and locks rows, asks the domain, writes and
//!   appends to the license's history. SQL lives only here.
//! * [`grpc`] — the tonic services. They parse requests into domain values,
//!   call the store, convert the answer, and map every error to a
//!   `tonic::Status` with a `google.rpc.ErrorInfo` in one place.
//! * [`server`] — wiring: services, health, reflection, limits, graceful
//!   shutdown. [`server::Application`] binds first (port 0 allowed) so tests
//!   run the real server.
//! * [`bench`] — `licensd bench`, the load generator: seeds a fresh
//!   database by bulk insert ([`store::bulk`]), starts the server (and a
//!   "ceiling" server whose Validate skips the store) as child processes,
//!   drives each workload with many calls in flight, checks every response's
//!   status and reports calls/s, latency percentiles, server CPU and memory.
//!   A tonic client, so it uses `tonic` types like [`grpc`] does.
//! * [`cli`] — the `licensd` command line (serve, migrate, token, bench).
//! * [`telemetry`] — logging setup.
//! * [`proto`] — the generated `licensing.v1` types.
//!
//! The binary (`src/main.rs`) only parses the command line and calls in here.

pub mod bench;
pub mod cli;
pub mod config_file;
pub mod domain;
pub mod grpc;
pub mod observe;
pub mod server;
pub mod signing;
pub mod store;
pub mod telemetry;

/// The generated `licensing.v1` API.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("licensing.v1");

    /// Encoded descriptors of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("licensing_descriptor");
}
