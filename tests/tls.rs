//! TLS and mutual TLS, with certificates made here by `rcgen`: a CA, a server
//! certificate for `localhost`/127.0.0.1, a client certificate from the same
//! CA and one from another CA. Both the library server
//! ([`Application`] with [`TlsFiles`]) and the real binary
//! (`licensd serve --tls-cert … --tls-key …`) are exercised.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use licensd::domain::license::LicenseKind;
use licensd::domain::{LicenseKey, ProductCode};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::server::{Application, Config, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const BIN: &str = env!("CARGO_BIN_EXE_licensd");
/// Upper bound for connecting plus one call; a refused handshake fails much
/// sooner.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A certificate and its private key, both PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A certificate authority that can sign leaves.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "licensd tests");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, common_name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Pem {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Everything a test needs, written as PEM files into a temporary directory.
struct Pki {
    dir: TempDir,
    ca: String,
    other_ca: String,
    client: Pem,
    foreign_client: Pem,
    server_cert: PathBuf,
    server_key: PathBuf,
    ca_file: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::new("licensd test CA");
        let other = Ca::new("some other CA");
        let server = ca.leaf(
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = ca.leaf("billing", &[], ExtendedKeyUsagePurpose::ClientAuth);
        let foreign_client = other.leaf("intruder", &[], ExtendedKeyUsagePurpose::ClientAuth);

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let server_cert = write("server.crt", &server.cert);
        let server_key = write("server.key", &server.key);
        let ca_file = write("ca.crt", &ca.pem);
        write("other-ca.crt", &other.pem);
        write("client.crt", &client.cert);
        write("client.key", &client.key);
        Pki {
            ca: ca.pem,
            other_ca: other.pem,
            client,
            foreign_client,
            server_cert,
            server_key,
            ca_file,
            dir,
        }
    }

    fn tls_files(&self, mtls: bool) -> TlsFiles {
        TlsFiles {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: mtls.then(|| self.ca_file.clone()),
        }
    }

    fn db_url(&self) -> String {
        format!("sqlite:{}", self.dir.path().join("licensd.db").display())
    }
}

// ---------------------------------------------------------------------------
// Server and clients
// ---------------------------------------------------------------------------

/// The library server over TLS on a fresh SQLite database.
struct TlsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TlsServer {
    async fn start(pki: &Pki, mtls: bool) -> TlsServer {
        licensd::telemetry::init_for_tests();
        let config = Config {
            listen: "127.0.0.1:0".into(),
            database_url: pki.db_url(),
            tls: Some(pki.tls_files(mtls)),
            ..Config::default()
        };
        let app = Application::build(config).await.expect("server builds");
        let addr = app.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        });
        TlsServer {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

/// How a client connects.
enum Client<'a> {
    /// `http://`, no TLS at all.
    Plaintext,
    /// TLS trusting `ca`, optionally presenting a certificate.
    Tls {
        ca: &'a str,
        identity: Option<&'a Pem>,
    },
}

/// A Validate request with a well-formed key nobody issued: answered OK
/// (VALIDITY_NOT_FOUND) by a server that lets the call through.
fn validate_request() -> pb::ValidateRequest {
    let product = ProductCode::parse("ACME").unwrap();
    pb::ValidateRequest {
        license_key: LicenseKey::generate(&product, LicenseKind::Standard).to_string(),
        ..Default::default()
    }
}

/// Connects as `client` and calls ActivationService/Validate; `Err` with a
/// description if connecting or the call failed (or took too long).
async fn validate(addr: SocketAddr, client: Client<'_>) -> Result<pb::ValidateResponse, String> {
    let attempt = async {
        let endpoint = match client {
            Client::Plaintext => Endpoint::from_shared(format!("http://{addr}")).unwrap(),
            Client::Tls { ca, identity } => {
                let mut tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("localhost");
                if let Some(id) = identity {
                    tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
                }
                // Dial the address itself (`localhost` may resolve to ::1
                // first); the certificate is checked against `localhost`.
                Endpoint::from_shared(format!("https://{addr}"))
                    .unwrap()
                    .tls_config(tls)
                    .map_err(|e| format!("client TLS config: {e:?}"))?
            }
        };
        let channel: Channel = endpoint
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        ActivationServiceClient::new(channel)
            .validate(validate_request())
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("call: {s:?}"))
    };
    match tokio::time::timeout(CALL_TIMEOUT * 2, attempt).await {
        Ok(res) => res,
        Err(_) => Err("timed out".into()),
    }
}

#[track_caller]
fn assert_served(res: Result<pb::ValidateResponse, String>) {
    let resp = res.expect("the call is served over TLS");
    assert_eq!(resp.validity, pb::Validity::NotFound as i32, "{resp:?}");
    assert!(!resp.valid);
}

/// The call failed in the transport (handshake refused, connection closed),
/// not with an answer of the service, and promptly.
#[track_caller]
fn assert_refused(what: &str, res: Result<pb::ValidateResponse, String>) {
    match res {
        Ok(resp) => panic!("{what}: expected the connection to be refused, got {resp:?}"),
        Err(e) => {
            assert_ne!(
                e, "timed out",
                "{what}: refused by hanging, not by an error"
            );
            assert!(
                e.contains("transport::Error(Transport"),
                "{what}: expected a transport failure, got {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Library server
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_ca_and_nobody_else() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki, false).await;
    let trusting = || Client::Tls {
        ca: &pki.ca,
        identity: None,
    };

    assert_served(validate(server.addr, trusting()).await);
    // Without client authentication a client certificate is simply not
    // asked for; presenting one does no harm.
    assert_served(
        validate(
            server.addr,
            Client::Tls {
                ca: &pki.ca,
                identity: Some(&pki.client),
            },
        )
        .await,
    );

    assert_refused(
        "plaintext client",
        validate(server.addr, Client::Plaintext).await,
    );
    assert_refused(
        "client trusting another CA",
        validate(
            server.addr,
            Client::Tls {
                ca: &pki.other_ca,
                identity: None,
            },
        )
        .await,
    );

    // The refused handshakes did not disturb the server.
    assert_served(validate(server.addr, trusting()).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_serves_only_clients_with_a_certificate_from_the_client_ca() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki, true).await;
    let with = |identity| Client::Tls {
        ca: &pki.ca,
        identity,
    };

    assert_served(validate(server.addr, with(Some(&pki.client))).await);
    assert_refused(
        "client without a certificate",
        validate(server.addr, with(None)).await,
    );
    assert_refused(
        "client with a certificate from another CA",
        validate(server.addr, with(Some(&pki.foreign_client))).await,
    );
    assert_refused(
        "plaintext client",
        validate(server.addr, Client::Plaintext).await,
    );
    assert_refused(
        "client trusting another CA",
        validate(
            server.addr,
            Client::Tls {
                ca: &pki.other_ca,
                identity: Some(&pki.client),
            },
        )
        .await,
    );

    assert_served(validate(server.addr, with(Some(&pki.client))).await);
    server.stop().await;
}

#[tokio::test]
async fn unreadable_tls_files_stop_the_server_with_an_error() {
    let pki = Pki::new();
    let config = Config {
        listen: "127.0.0.1:0".into(),
        database_url: pki.db_url(),
        tls: Some(TlsFiles {
            cert: pki.dir.path().join("missing.crt"),
            key: pki.server_key.clone(),
            client_ca: None,
        }),
        ..Config::default()
    };
    let app = Application::build(config).await.expect("server builds");
    let res = tokio::time::timeout(CALL_TIMEOUT, app.run_until(std::future::pending()))
        .await
        .expect("fails promptly instead of serving");
    let err = res.expect_err("a missing certificate file is an error");
    assert!(err.to_string().contains("missing.crt"), "{err}");
}

// ---------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------

/// A `licensd serve` child process; killed when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn licensd(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for var in [
        "LICENSD_TLS_CERT",
        "LICENSD_TLS_KEY",
        "LICENSD_TLS_CLIENT_CA",
        "LICENSD_LISTEN",
        "LICENSD_DATABASE_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Starts `licensd serve` with `tls_args` and returns it with the address
/// from its JSON log.
fn serve_binary(pki: &Pki, tls_args: &[&Path]) -> (Serve, SocketAddr) {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--log-format".into(),
        "json".into(),
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database-url".into(),
        pki.db_url().into(),
    ];
    for (flag, path) in ["--tls-cert", "--tls-key", "--tls-client-ca"]
        .iter()
        .zip(tls_args)
    {
        args.push(flag.into());
        args.push(path.as_os_str().into());
    }
    let mut child = licensd(pki.dir.path())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Serve(child);

    // Read the log on a thread (so that waiting is bounded) and keep
    // draining it afterwards so that the server never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel::<Result<String, String>>();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("licensd serving") {
                let addr = line
                    .split("\"addr\":\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .map(str::to_string);
                let _ = tx.send(addr.ok_or_else(|| format!("no addr in {line}")));
                sent = true;
            } else if !sent {
                seen.push(line);
            }
        }
        if !sent {
            let _ = tx.send(Err(format!("log ended before serving: {seen:?}")));
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server reports its address in time")
        .unwrap_or_else(|e| panic!("{e}"));
    (child, addr.parse().expect("a socket address"))
}

#[test]
fn binary_serves_over_tls_with_tls_cert_and_tls_key() {
    let pki = Pki::new();
    let (_server, addr) = serve_binary(&pki, &[&pki.server_cert, &pki.server_key]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_served(
            validate(
                addr,
                Client::Tls {
                    ca: &pki.ca,
                    identity: None,
                },
            )
            .await,
        );
        assert_refused("plaintext client", validate(addr, Client::Plaintext).await);
        assert_refused(
            "client trusting another CA",
            validate(
                addr,
                Client::Tls {
                    ca: &pki.other_ca,
                    identity: None,
                },
            )
            .await,
        );
    });
}

#[test]
fn binary_requires_client_certificates_with_tls_client_ca() {
    let pki = Pki::new();
    let (_server, addr) = serve_binary(&pki, &[&pki.server_cert, &pki.server_key, &pki.ca_file]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let with = |identity| Client::Tls {
            ca: &pki.ca,
            identity,
        };
        assert_served(validate(addr, with(Some(&pki.client))).await);
        assert_refused("no client certificate", validate(addr, with(None)).await);
        assert_refused(
            "client certificate from another CA",
            validate(addr, with(Some(&pki.foreign_client))).await,
        );
    });
}

#[test]
fn binary_refuses_half_a_tls_configuration() {
    let pki = Pki::new();
    let cert = pki.server_cert.display().to_string();
    let key = pki.server_key.display().to_string();
    let ca = pki.ca_file.display().to_string();
    let db = pki.db_url();
    let cases: [&[&str]; 3] = [
        &["--tls-cert", &cert],
        &["--tls-key", &key],
        &["--tls-client-ca", &ca],
    ];
    for tls_args in cases {
        let mut child = licensd(pki.dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &db])
            .args(tls_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Clap refuses before anything is bound; never let a server that
        // unexpectedly started hang the test.
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{tls_args:?}: the server started instead of refusing the flags");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{tls_args:?} was accepted");
        assert_eq!(
            status.code(),
            Some(2),
            "{tls_args:?}: a usage error; {stderr}"
        );
        assert!(
            stderr.contains("--tls-"),
            "{tls_args:?}: the message names the missing flag: {stderr}"
        );
    }
    assert!(
        !pki.dir.path().join("licensd.db").exists(),
        "no database is created for a refused command line"
    );
}
