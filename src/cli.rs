//! The command line of the `licensd` binary (docs/operations.md, Commands).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::domain::auth::{Role, Token};
use crate::grpc::admission::AdmissionLimits;
use crate::grpc::auth::LimitConfig;
use crate::observe::client::TrustedProxies;
use crate::server::{self, Application, Config, TlsFiles};
use crate::store::{DatabaseUrl, Store};
use crate::telemetry::{self, LogFormat};

/// `licensd`: the licensing service.
#[derive(Parser)]
#[command(name = "licensd", version, about = "gRPC licensing service")]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "LICENSD_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    /// Settings from a TOML file (keys: the flags' names in snake case),
    /// below flags and environment variables; see docs/licensd.example.toml.
    #[arg(long, env = "LICENSD_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Database {
    /// Database: sqlite:PATH (or a bare path), or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "LICENSD_DATABASE_URL",
        default_value = "sqlite:licensd.db"
    )]
    database_url: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server (creates and migrates the database first).
    Serve(Box<ServeArgs>),
    /// Create or upgrade the database schema, then exit.
    Migrate(Database),
    /// Manage the bearer tokens of billing and support callers.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage the keys that sign offline license certificates.
    #[command(subcommand)]
    SigningKey(SigningKeyCommand),
    /// Look into offline license certificates.
    #[command(subcommand)]
    Certificate(CertificateCommand),
    /// Seed a fresh database, start the server and measure calls/s,
    /// latency, CPU and memory under load (and the Validate ceiling).
    Bench(Box<BenchArgs>),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LICENSD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    #[command(flatten)]
    db: Database,
    /// PostgreSQL connections per replica: half for the writes, half for
    /// the reads.
    #[arg(long, env = "LICENSD_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: u32,
    /// Longest a call waits for the database (a connection, a lock, an
    /// answer) before it is answered UNAVAILABLE, reason
    /// DATABASE_UNAVAILABLE; also the pools' acquire timeout, PostgreSQL's
    /// lock_timeout and SQLite's busy_timeout.
    #[arg(long, env = "LICENSD_DATABASE_TIMEOUT_MS", default_value_t = crate::store::DEFAULT_DATABASE_TIMEOUT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    database_timeout_ms: u64,
    /// How long a starting server waits for an unreachable database
    /// (connection refused or timed out, PostgreSQL starting up), trying
    /// again, before it exits; 0 exits at once. A bad URL, refused
    /// credentials or a failed migration exit at once either way.
    #[arg(long, env = "LICENSD_DATABASE_WAIT_SECONDS", default_value_t = crate::server::DEFAULT_DATABASE_WAIT.as_secs(), value_parser = clap::value_parser!(u64).range(0..=3_600))]
    database_wait_seconds: u64,
    /// SQLite only: when a commit reaches the disk. `full` (the default)
    /// syncs the write-ahead log before a write is acknowledged, so an
    /// acknowledged write survives a power cut or an operating system
    /// crash; the writes queued meanwhile share one sync. `normal` syncs
    /// at checkpoints only: a killed process still loses nothing, but a
    /// power cut can lose the last acknowledged writes (the file stays
    /// consistent), for less disk traffic and a lower write latency.
    #[arg(long, env = "LICENSD_SQLITE_SYNCHRONOUS", default_value = "full", value_parser = ["full", "normal"])]
    sqlite_synchronous: String,
    /// SQLite only: MiB of the database file that Validate's readers map
    /// into memory (SQLite's mmap_size). Lookups get cheaper (no read
    /// system call and copy per page), but every mapped page a lookup
    /// touches counts in the process's resident set, up to the file's size.
    /// 0 (the default) maps nothing.
    #[arg(long, env = "LICENSD_SQLITE_MMAP_MIB", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    sqlite_mmap_mib: u64,
    /// SQLite only: MiB of the database file the writer maps into memory.
    /// A write reads the pages it changes through the mapping instead of
    /// a read system call and copy per page (about 10 % of a renewal's
    /// server CPU), but the pages it touched count in the resident set (as
    /// shared file pages the kernel can drop like its page cache), up to
    /// the file's size. 0 (the default) maps nothing.
    #[arg(long, env = "LICENSD_SQLITE_WRITER_MMAP_MIB", default_value_t = crate::store::sqlite::DEFAULT_WRITER_MMAP_MIB, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    sqlite_writer_mmap_mib: u64,
    /// Answer Validate from the database on every call instead of from the
    /// in-memory validation cache (which holds ~70 bytes per license and
    /// shows any change made on another replica within 1 s).
    #[arg(long, env = "LICENSD_NO_VALIDATE_CACHE")]
    no_validate_cache: bool,
    /// How often the validation cache polls the database for changes made
    /// by other replicas (a replica sees its own changes at once).
    #[arg(long, env = "LICENSD_VALIDATE_CACHE_REFRESH_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=500))]
    validate_cache_refresh_ms: u64,
    /// How long after its last successful poll the validation cache may
    /// still answer Validate: the most its answers can lag behind the
    /// database, and how long Validate rides through a database outage
    /// before it is answered UNAVAILABLE. Above 1000 the promise that every
    /// replica shows a change within 1 s holds only while the database is
    /// reachable. At least twice the refresh interval.
    #[arg(long, env = "LICENSD_VALIDATE_CACHE_MAX_STALENESS_MS", default_value_t = crate::store::validation_cache::DEFAULT_MAX_STALENESS.as_millis() as u64, value_parser = clap::value_parser!(u64).range(20..=3_600_000))]
    validate_cache_max_staleness_ms: u64,
    /// Seconds in-flight calls may take to finish after SIGINT/SIGTERM.
    #[arg(long, env = "LICENSD_DRAIN_SECONDS", default_value_t = 10)]
    drain_seconds: u64,
    /// Seconds a WatchEvents stream waits for its consumer to take the next
    /// event; then the stream ends (CONSUMER_TOO_SLOW) and the consumer
    /// resumes from its last cursor.
    #[arg(long, env = "LICENSD_WATCH_STALL_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    watch_stall_seconds: u64,
    /// TLS certificate chain (PEM); with --tls-key enables TLS.
    #[arg(long, env = "LICENSD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "LICENSD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: enables mTLS.
    #[arg(long, env = "LICENSD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// ActivationService calls other than Validate (Activate, Deactivate,
    /// RedeemRenewalCode, GetSigningKeys) per second per client IP, burst
    /// twice that (0: unlimited).
    #[arg(long, env = "LICENSD_ACTIVATION_RATE_PER_IP", default_value_t = LimitConfig::default().activation_per_ip_per_sec)]
    activation_rate_per_ip: u32,
    /// Validate calls per second per client IP, burst twice that (0:
    /// unlimited); high, since a whole site behind one NAT is one address.
    #[arg(long, env = "LICENSD_VALIDATE_RATE_PER_IP", default_value_t = LimitConfig::default().validate_per_ip_per_sec)]
    validate_rate_per_ip: u32,
    /// Load balancers or proxies (CIDRs or addresses, comma-separated)
    /// whose calls name their client in `x-forwarded-for` (the right-most
    /// hop that is not one of them) or `x-real-ip`; the per-address limits
    /// and the history use that client. From any other peer these
    /// headers are ignored. None by default.
    #[arg(long, env = "LICENSD_TRUSTED_PROXIES", value_name = "CIDR,...", value_parser = TrustedProxies::parse)]
    trusted_proxies: Option<TrustedProxies>,
    /// Attempts with unknown renewal codes per license key and hour (0: unlimited).
    #[arg(long, env = "LICENSD_CODE_FAILURES_PER_HOUR", default_value_t = LimitConfig::default().code_failures_per_window)]
    code_failures_per_hour: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default).
    /// Keep the address private: it is not authenticated.
    #[arg(long, env = "LICENSD_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Validate calls in flight beyond which Validate is refused at once
    /// (UNAVAILABLE, reason OVERLOADED, with a retry delay); 0: no limit.
    #[arg(long, env = "LICENSD_MAX_VALIDATES_IN_FLIGHT", default_value_t = AdmissionLimits::default().validate)]
    max_validates_in_flight: u32,
    /// Other licensing calls (writes, reads) in flight beyond which they
    /// are refused at once; 0: no limit. Health and reflection never are.
    #[arg(long, env = "LICENSD_MAX_CALLS_IN_FLIGHT", default_value_t = AdmissionLimits::default().other)]
    max_calls_in_flight: u32,
    /// The issuer (`iss`) of offline license certificates.
    #[arg(long, env = "LICENSD_CERTIFICATE_ISSUER", default_value = "licensd")]
    certificate_issuer: String,
    /// Sign offline license certificates with this Ed25519 key (PKCS#8
    /// PEM) instead of the database's keys; it is then the only key
    /// published.
    #[arg(long, env = "LICENSD_SIGNING_KEY_FILE", value_name = "PEM")]
    signing_key_file: Option<PathBuf>,
    /// Benchmark only: Validate answers a fixed VALID response without
    /// touching the store (the ceiling `licensd bench` compares against).
    #[arg(long, hide = true)]
    validate_ceiling: bool,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (only the token) on stdout. Shown once.
    Create {
        /// admin, billing or support.
        #[arg(long, value_parser = ["admin", "billing", "support"])]
        role: String,
        /// A name for the caller, recorded as the actor of its changes.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        db: Database,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        db: Database,
    },
    /// Revoke the live token NAME; every replica refuses it from then on.
    Revoke {
        /// Token name.
        name: String,
        #[command(flatten)]
        db: Database,
    },
}

#[derive(Subcommand)]
enum SigningKeyCommand {
    /// List the keys: id, state (active, published, retired), creation and
    /// retirement times (tab-separated; never a private key).
    List {
        #[command(flatten)]
        db: Database,
    },
    /// Make a new key the signer; the old one stays published, so the
    /// certificates it signed keep verifying. Every replica signs with the
    /// new key within 5 s. Prints the new key's id.
    Rotate {
        #[command(flatten)]
        db: Database,
    },
    /// Stop publishing the key KID: certificates it signed no longer verify
    /// against the published keys. The active key cannot be retired.
    Retire {
        /// Key id, as `list` prints it (a base64url thumbprint, which may
        /// begin with `-`).
        #[arg(allow_hyphen_values = true)]
        kid: String,
        #[command(flatten)]
        db: Database,
    },
}

#[derive(Subcommand)]
enum CertificateCommand {
    /// Print a certificate's header and claims (times also as dates), and
    /// with --jwks whether its signature verifies (exit status 1 if not).
    Inspect {
        /// The certificate (a compact JWS), or `-` to read it from stdin.
        cert: String,
        /// A JWK Set file, e.g. GetSigningKeys' `jwks` saved to a file.
        #[arg(long, value_name = "FILE")]
        jwks: Option<PathBuf>,
    },
}

type BoxError = Box<dyn std::error::Error>;

/// Parses the command line (and `--config`), runs the command, and prints
/// a failure once: a plain line on stderr, or with `--log-format json` one
/// JSON log line.
pub async fn main() -> ExitCode {
    let cli = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(Parse::Clap(e)) => e.exit(),
        Err(Parse::Config(e)) => {
            eprintln!("licensd: {e}");
            return ExitCode::from(2);
        }
    };
    let format = cli.log_format;
    telemetry::init(format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match format {
                LogFormat::Json => tracing::error!(error = %e, "licensd failed"),
                LogFormat::Text => eprintln!("licensd: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// Why the command line was refused.
enum Parse {
    /// By clap (it prints its own message and usage).
    Clap(clap::Error),
    /// The `--config` file.
    Config(String),
}

/// The command line, with the `--config` file's settings where neither a
/// flag nor an environment variable gave one (see [`crate::config_file`]).
fn parse(argv: Vec<std::ffi::OsString>) -> Result<Cli, Parse> {
    use clap::{CommandFactory, FromArgMatches};
    let command = Cli::command();
    let matches = command
        .clone()
        .try_get_matches_from(&argv)
        .map_err(Parse::Clap)?;
    let cli = Cli::from_arg_matches(&matches).map_err(Parse::Clap)?;
    let Some(path) = &cli.config else {
        return Ok(cli);
    };
    let extra = crate::config_file::extra_args(path, &command, &matches).map_err(Parse::Config)?;
    if extra.is_empty() {
        return Ok(cli);
    }
    let mut argv = argv;
    argv.extend(extra);
    Cli::try_parse_from(argv).map_err(|e| Parse::Config(format!("{}: {e}", path.display())))
}

/// Runs the parsed command.
async fn run(cli: Cli) -> Result<(), BoxError> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate(db) => {
            DatabaseUrl::parse(&db.database_url)?.migrate().await?;
            tracing::info!("database migrated");
            Ok(())
        }
        Command::Token(cmd) => token(cmd).await,
        Command::SigningKey(cmd) => signing_key(cmd).await,
        Command::Certificate(CertificateCommand::Inspect { cert, jwks }) => {
            inspect_certificate(&cert, jwks.as_deref())
        }
        Command::Bench(args) => crate::bench::run(*args)
            .await
            .map_err(|e| -> BoxError { e }),
    }
}

async fn serve(a: ServeArgs) -> Result<(), BoxError> {
    if a.validate_cache_max_staleness_ms < 2 * a.validate_cache_refresh_ms {
        return Err(format!(
            "--validate-cache-max-staleness-ms ({}) must be at least twice --validate-cache-refresh-ms ({}), \
             or the validation cache would hardly ever answer",
            a.validate_cache_max_staleness_ms, a.validate_cache_refresh_ms
        )
        .into());
    }
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert,
            key,
            client_ca: a.tls_client_ca,
        }),
        _ => None,
    };
    let config = Config {
        listen: a.listen,
        database_url: a.db.database_url,
        db_max_connections: a.db_max_connections,
        database_timeout: Duration::from_millis(a.database_timeout_ms),
        database_wait: Duration::from_secs(a.database_wait_seconds),
        sqlite_synchronous: a.sqlite_synchronous.parse()?,
        sqlite_mmap_mib: a.sqlite_mmap_mib,
        sqlite_writer_mmap_mib: a.sqlite_writer_mmap_mib,
        validate_cache_refresh: (!a.no_validate_cache)
            .then(|| Duration::from_millis(a.validate_cache_refresh_ms)),
        validate_cache_max_staleness: Duration::from_millis(a.validate_cache_max_staleness_ms),
        drain_timeout: Duration::from_secs(a.drain_seconds),
        watch_stall: Duration::from_secs(a.watch_stall_seconds),
        limits: LimitConfig {
            activation_per_ip_per_sec: a.activation_rate_per_ip,
            validate_per_ip_per_sec: a.validate_rate_per_ip,
            code_failures_per_window: a.code_failures_per_hour,
            code_failure_window: Duration::from_secs(3600),
        },
        trusted_proxies: a.trusted_proxies.unwrap_or_default(),
        tls,
        metrics_listen: a.metrics_listen,
        admission: AdmissionLimits {
            validate: a.max_validates_in_flight,
            other: a.max_calls_in_flight,
        },
        certificate_issuer: a.certificate_issuer,
        signing_key_file: a.signing_key_file,
        validate_ceiling: a.validate_ceiling,
        ..Config::default()
    };
    Application::build(config)
        .await?
        .run_until(server::shutdown_signal())
        .await?;
    Ok(())
}

fn inspect_certificate(cert: &str, jwks: Option<&std::path::Path>) -> Result<(), BoxError> {
    let cert = if cert == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        text
    } else {
        cert.to_string()
    };
    let jwks = jwks
        .map(|p| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display())))
        .transpose()?;
    let found = crate::signing::inspect(&cert, jwks.as_deref())?;
    println!("header: {}", found.header);
    println!("claims:");
    if let Some(claims) = found.claims.as_object() {
        for (name, value) in claims {
            let date = match (name.as_str(), value.as_i64()) {
                ("iat" | "nbf" | "exp" | "license_expires_at", Some(t)) => {
                    chrono::DateTime::from_timestamp(t, 0)
                        .map(|d| format!("  ({})", d.to_rfc3339()))
                        .unwrap_or_default()
                }
                _ => String::new(),
            };
            println!("  {name}: {value}{date}");
        }
    }
    let now = chrono::Utc::now().timestamp();
    if let Some(exp) = found.claims["exp"].as_i64() {
        if exp > now {
            println!("expires in {:.1} days", (exp - now) as f64 / 86_400.0);
        } else {
            println!("expired {:.1} days ago", (now - exp) as f64 / 86_400.0);
        }
    }
    match found.signature {
        None => {
            println!("signature: not checked (pass --jwks FILE with the published keys)");
            Ok(())
        }
        Some(Ok(kid)) => {
            println!("signature: verifies with key {kid}");
            Ok(())
        }
        Some(Err(why)) => Err(format!("signature: does not verify: {why}").into()),
    }
}

async fn signing_key(cmd: SigningKeyCommand) -> Result<(), BoxError> {
    use crate::signing::{KeyState, new_key};
    use crate::store::sql::signing_keys::Retired;
    let db = match &cmd {
        SigningKeyCommand::List { db }
        | SigningKeyCommand::Rotate { db }
        | SigningKeyCommand::Retire { db, .. } => db.database_url.clone(),
    };
    let store = DatabaseUrl::parse(&db)?.open(Default::default()).await?;
    let now = crate::domain::time::truncate_micros(chrono::Utc::now());
    let result: Result<(), BoxError> = async {
        match cmd {
            SigningKeyCommand::List { .. } => {
                for k in store.signing_keys().await? {
                    let retired = k
                        .retired_at
                        .map(|t| format!("\tretired {}", t.to_rfc3339()))
                        .unwrap_or_default();
                    println!(
                        "{}\t{}\tcreated {}{retired}",
                        k.kid,
                        k.state.as_str(),
                        k.created_at.to_rfc3339()
                    );
                }
            }
            SigningKeyCommand::Rotate { .. } => {
                let key = new_key(now);
                store.rotate_signing_key(&key).await?;
                println!("{}", key.kid);
            }
            SigningKeyCommand::Retire { kid, .. } => {
                match store.retire_signing_key(&kid, now).await? {
                    Retired::Now => eprintln!("retired {kid}"),
                    Retired::Already => eprintln!("{kid} was already retired"),
                    Retired::IsActive => {
                        return Err(format!(
                            "{kid} is the {} key: rotate first, then retire it",
                            KeyState::Active.as_str()
                        )
                        .into());
                    }
                    Retired::NotFound => return Err(format!("no signing key {kid:?}").into()),
                }
            }
        }
        Ok(())
    }
    .await;
    store.close().await;
    result
}

async fn token(cmd: TokenCommand) -> Result<(), BoxError> {
    let open = |db: &Database| {
        let url = db.database_url.clone();
        async move {
            DatabaseUrl::parse(&url)?
                .open(Default::default())
                .await
                .map_err(BoxError::from)
        }
    };
    let now = crate::domain::time::truncate_micros(chrono::Utc::now());
    match cmd {
        TokenCommand::Create { role, name, db } => {
            let role = Role::parse(&role).ok_or("role must be admin, billing or support")?;
            let name = crate::domain::rules::input::required_text("name", &name, 64)
                .map_err(|v| format!("--name: {}", v.description))?;
            let store = open(&db).await?;
            let token = Token::generate();
            store.create_token(&name, role, &token, now).await?;
            store.close().await;
            println!("{}", token.expose());
        }
        TokenCommand::List { db } => {
            let store = open(&db).await?;
            for t in store.list_tokens().await? {
                let state = match t.revoked_at {
                    Some(at) => format!("revoked {}", at.to_rfc3339()),
                    None => "live".to_string(),
                };
                println!(
                    "{}\t{}\t{}\tcreated {}\t{}",
                    t.name,
                    t.role,
                    t.id,
                    t.created_at.to_rfc3339(),
                    state
                );
            }
            store.close().await;
        }
        TokenCommand::Revoke { name, db } => {
            let store = open(&db).await?;
            let revoked = store.revoke_token(&name, now).await?;
            store.close().await;
            if !revoked {
                return Err(format!("no live token named {name:?}").into());
            }
            eprintln!("revoked {name}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_id_may_begin_with_a_hyphen() {
        for argv in [
            [
                "licensd",
                "signing-key",
                "retire",
                "-1AbC_x",
                "--database-url",
                "sqlite:x.db",
            ],
            [
                "licensd",
                "signing-key",
                "retire",
                "--database-url",
                "sqlite:x.db",
                "-1AbC_x",
            ],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            match cli.command {
                Command::SigningKey(SigningKeyCommand::Retire { kid, db }) => {
                    assert_eq!(kid, "-1AbC_x");
                    assert_eq!(db.database_url, "sqlite:x.db");
                }
                _ => panic!("not retire"),
            }
        }
    }
}
