//! "Secrets never in logs" (docs/operations.md, Serving: Logs): the real
//! binary, logging JSON at debug level, is driven through a whole licensing
//! story — products, licenses, activations, renewal codes redeemed wrongly
//! and rightly, voided codes, refusals — and its complete stderr is then
//! searched for secrets.
//!
//! * no full license key (display form, normalised form, either case);
//! * no renewal code in any form (dashed, normalised, lower case);
//! * no bearer token or token secret;
//! * no private signing key (PEM, PKCS#8 DER, the raw seed in base64 or hex),
//!   neither the first one nor one made by `licensd signing-key rotate`, in
//!   the server's log, the CLI's output, or any answer (GetSigningKeys'
//!   key set, certificates);
//! * but the shortened key (`LicenseKey::redacted()`) does appear, so this test
//!   fails if logging disappears rather than passing vacuously.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{BearerAuth, code_req, license_req};
use licensd::domain::keys::{LicenseKey, RenewalCode};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_licensd");

/// The running binary and the thread collecting its stderr.
struct Server {
    child: Child,
    addr: String,
    stderr: JoinHandle<Vec<String>>,
}

fn start(db_url: &str) -> Server {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--database-url",
            db_url,
        ])
        .env("RUST_LOG", "debug")
        .env_remove("LICENSD_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn licensd serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("licensd serving")
                && let Some(tx) = tx.take()
            {
                let addr = line
                    .split("\"addr\":\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or_default()
                    .to_string();
                let _ = tx.send(addr);
            }
            all.push(line);
        }
        all
    });
    let addr = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server never logged `licensd serving`: {:?}", reader.join());
        }
    };
    assert!(!addr.is_empty(), "no address in the serving line");
    Server {
        child,
        addr,
        stderr: reader,
    }
}

impl Server {
    /// SIGTERM, wait for a clean exit; returns every stderr and stdout line.
    fn stop(mut self) -> Vec<String> {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let start = Instant::now();
        let exit = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!("server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(exit.success(), "exit status {exit:?}");
        let mut lines = self.stderr.join().expect("stderr reader");
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        lines.extend(out.lines().map(str::to_string));
        lines
    }
}

/// `licensd token create` against `db_url`; returns the token. Its own stderr
/// must not show the token either.
fn cli_token(db_url: &str, role: &str, name: &str) -> String {
    let out = Command::new(BIN)
        .args([
            "token",
            "create",
            "--role",
            role,
            "--name",
            name,
            "--database-url",
            db_url,
        ])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let token = String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string();
    assert!(
        !stderr.contains(&token),
        "`token create` logged its token: {stderr}"
    );
    token
}

/// A secret and the forms it must never appear in.
struct Secret {
    what: String,
    forms: Vec<String>,
}

fn key_secret(what: &str, key: &str) -> Secret {
    let parsed = LicenseKey::parse(key).expect("a well-formed key");
    let display = parsed.to_string();
    let normalized = parsed.normalized().to_string();
    Secret {
        what: format!("license key {what}"),
        forms: vec![
            display.to_lowercase(),
            normalized.to_lowercase(),
            display,
            normalized,
        ],
    }
}

fn code_secret(what: &str, code: &str) -> Secret {
    let parsed = RenewalCode::parse(code).expect("a well-formed code");
    let display = parsed.expose_display();
    let normalized = parsed.expose_normalized().to_string();
    Secret {
        what: format!("renewal code {what}"),
        forms: vec![
            display.to_lowercase(),
            normalized.to_lowercase(),
            // The random part alone (what is left when the `RC` marker is cut off).
            normalized[2..].to_string(),
            display,
            normalized,
        ],
    }
}

fn token_secret(what: &str, token: &str) -> Secret {
    let secret = token.rsplit('_').next().unwrap().to_string();
    assert_eq!(secret.len(), 32, "token shape lsd_<id>_<secret>");
    Secret {
        what: format!("token {what}"),
        forms: vec![token.to_string(), secret],
    }
}

/// The forms a stored signing key (PKCS#8 DER) could leak in: the PEM
/// and its body, the DER and the raw 32-byte seed in base64 (standard and
/// URL-safe, padded or not) and hex, and the seed as a byte list (`{:?}`,
/// JSON).
fn signing_key_secret(kid: &str, private_der: &[u8]) -> Secret {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
    let key = ed25519_dalek::SigningKey::from_pkcs8_der(private_der).expect("a stored PKCS#8 key");
    let seed = key.to_bytes();
    let pem = key
        .to_pkcs8_pem(Default::default())
        .expect("PEM")
        .to_string();
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    // The PEM's marker too: no private key of any kind belongs in a log.
    let mut forms = vec![
        pem.trim_end().to_string(),
        body,
        "BEGIN PRIVATE KEY".to_string(),
    ];
    for bytes in [&seed[..], private_der] {
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            forms.push(engine.encode(bytes));
        }
        forms.push(hex::encode(bytes));
        forms.push(hex::encode_upper(bytes));
    }
    // The seed's first 30 bytes (40 base64 characters, no padding): what
    // any base64 that starts with the seed starts with, e.g. an expanded
    // keypair (seed ‖ public key).
    forms.push(STANDARD.encode(&seed[..30]));
    forms.push(URL_SAFE.encode(&seed[..30]));
    forms.push(format!("{seed:?}"));
    forms.push(serde_json::to_string(&seed.to_vec()).unwrap());
    forms.sort();
    forms.dedup();
    Secret {
        what: format!("private signing key {kid}"),
        forms,
    }
}

/// The kid a certificate's JWS header names.
fn kid_of(jws: &str) -> String {
    use base64::Engine;
    let header = jws.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .expect("base64url header"),
    )
    .expect("JSON header");
    header["kid"].as_str().expect("kid").to_string()
}

/// Signing keys at work: GetSigningKeys, certificates from Activate and
/// Validate, `licensd signing-key rotate` (logging at debug) while the
/// server runs, and certificates signed with the new key. Returns every
/// answer as text and the CLI's output lines.
async fn signing_story(addr: &str, db_url: &str, key: &str) -> (Vec<String>, Vec<String>) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut activation = ActivationServiceClient::new(channel);
    let mut answers = Vec::new();
    let validate = pb::ValidateRequest {
        license_key: key.into(),
        fingerprint: "ws-1".into(),
        client_version: "2.0.0".into(),
        certificate_expires_at: None,
    };
    let jwks = activation
        .get_signing_keys(pb::GetSigningKeysRequest {})
        .await
        .expect("GetSigningKeys")
        .into_inner();
    answers.push(format!("{jwks:?}"));
    answers.push(jwks.jwks);
    let v = activation
        .validate(validate.clone())
        .await
        .expect("validate")
        .into_inner();
    let first_kid = kid_of(&v.license_certificate);
    answers.push(format!("{v:?}"));

    let out = Command::new(BIN)
        .args(["signing-key", "rotate", "--database-url", db_url])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let new_kid = stdout.trim().to_string();
    assert_ne!(new_kid, first_kid);
    let cli_lines: Vec<String> = stderr
        .lines()
        .chain(stdout.lines())
        .map(String::from)
        .collect();

    // The server re-reads its keys every 5 s: wait until it signs with the
    // new one, so that the new key is the one in use while logging.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = activation
            .validate(validate.clone())
            .await
            .expect("validate")
            .into_inner();
        answers.push(format!("{v:?}"));
        if kid_of(&v.license_certificate) == new_kid {
            break;
        }
        assert!(Instant::now() < deadline, "the rotation was never seen");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = activation
        .activate(pb::ActivateRequest {
            license_key: key.into(),
            fingerprint: "ws-5".into(),
            hostname: "host-ws-5".into(),
            client_version: "2.0.0".into(),
        })
        .await
        .expect("activate after the rotation")
        .into_inner();
    assert_eq!(kid_of(&a.license_certificate), new_kid);
    answers.push(format!("{a:?}"));
    let jwks = activation
        .get_signing_keys(pb::GetSigningKeysRequest {})
        .await
        .expect("GetSigningKeys")
        .into_inner();
    assert!(jwks.jwks.contains(&new_kid) && jwks.jwks.contains(&first_kid));
    answers.push(format!("{jwks:?}"));
    answers.push(jwks.jwks);
    (answers, cli_lines)
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Drives the licensing story; returns the secrets it handled and the key
/// whose shortened form must be logged.
async fn story(addr: &str, db_url: &str) -> (Vec<Secret>, String) {
    let admin = cli_token(db_url, "admin", "ops");
    let support = cli_token(db_url, "support", "desk");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let auth = BearerAuth::new(Some(&admin));
    let mut products = ProductServiceClient::with_interceptor(channel.clone(), auth.clone());
    let mut licenses = LicenseServiceClient::with_interceptor(channel.clone(), auth);
    let mut support_licenses =
        LicenseServiceClient::with_interceptor(channel.clone(), BearerAuth::new(Some(&support)));
    let mut anonymous = LicenseServiceClient::new(channel.clone());
    let mut activation = ActivationServiceClient::new(channel.clone());

    products
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                display_name: "Acme".into(),
                latest_version: "2.0.0".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("create product");
    let key = licenses
        .issue_license(license_req("ACME", 2, 1))
        .await
        .expect("issue license")
        .into_inner()
        .key;
    let other_key = licenses
        .issue_license(license_req("ACME", 1, 1))
        .await
        .expect("issue a second license")
        .into_inner()
        .key;

    let activate = |key: &str, fp: &str| pb::ActivateRequest {
        license_key: key.into(),
        fingerprint: fp.into(),
        hostname: format!("host-{fp}"),
        client_version: "2.0.0".into(),
    };
    activation
        .activate(activate(&key, "ws-1"))
        .await
        .expect("activate");
    // The key as a user might type it: lower case.
    activation
        .activate(activate(&key.to_lowercase(), "ws-2"))
        .await
        .expect("activate, lower-case key");
    let v = activation
        .validate(pb::ValidateRequest {
            license_key: key.clone(),
            fingerprint: "ws-1".into(),
            client_version: "2.0.0".into(),
            certificate_expires_at: None,
        })
        .await
        .expect("validate")
        .into_inner();
    assert_eq!(v.validity, pb::Validity::Valid as i32);

    let code = licenses
        .issue_renewal_code(code_req("ACME", 2, 1))
        .await
        .expect("issue code")
        .into_inner()
        .renewal_code;
    let redeem = |code: &str, fp: &str, version: &str| pb::RedeemRenewalCodeRequest {
        license_key: key.clone(),
        renewal_code: code.into(),
        fingerprint: fp.into(),
        client_version: version.into(),
    };
    // Wrongly: an outdated client, then a machine that is not activated.
    let st = activation
        .redeem_renewal_code(redeem(&code, "ws-1", "1.0.0"))
        .await
        .expect_err("outdated client");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    let st = activation
        .redeem_renewal_code(redeem(&code, "ws-unknown", "2.0.0"))
        .await
        .expect_err("unknown fingerprint");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    // Rightly, with the code typed in lower case without dashes.
    let normalized_code = RenewalCode::parse(&code)
        .unwrap()
        .expose_normalized()
        .to_lowercase();
    activation
        .redeem_renewal_code(redeem(&normalized_code, "ws-1", "2.0.0"))
        .await
        .expect("redeem");
    // Again: already redeemed.
    let st = activation
        .redeem_renewal_code(redeem(&code, "ws-1", "2.0.0"))
        .await
        .expect_err("redeemed twice");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    // A well-formed code nobody issued.
    let unknown_code = RenewalCode::generate().expose_display();
    let st = activation
        .redeem_renewal_code(redeem(&unknown_code, "ws-1", "2.0.0"))
        .await
        .expect_err("unknown code");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");

    // Another code: looked up by support, voided by billing (admin here).
    let voided = licenses
        .issue_renewal_code(code_req("ACME", 1, 1))
        .await
        .expect("issue code")
        .into_inner()
        .renewal_code;
    support_licenses
        .get_renewal_code(pb::GetRenewalCodeRequest {
            renewal_code: voided.to_lowercase(),
        })
        .await
        .expect("support reads a code");
    licenses
        .void_renewal_code(pb::VoidRenewalCodeRequest {
            renewal_code: voided.clone(),
            reason: "refund".into(),
            request_id: String::new(),
        })
        .await
        .expect("void");
    // A code where a key belongs.
    let v = activation
        .validate(pb::ValidateRequest {
            license_key: voided.clone(),
            fingerprint: String::new(),
            client_version: String::new(),
            certificate_expires_at: None,
        })
        .await
        .expect("validate a code")
        .into_inner();
    assert_eq!(v.validity, pb::Validity::RenewalCode as i32);
    let st = activation
        .activate(activate(&code, "ws-3"))
        .await
        .expect_err("activate with a code");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");

    // Refusals: no token, a forged token, the wrong role, a mistyped key,
    // an unknown key, a suspended license.
    let st = anonymous
        .get_license(pb::GetLicenseRequest {
            license_key: key.clone(),
        })
        .await
        .expect_err("no token");
    assert_eq!(st.code(), Code::Unauthenticated);
    // Change the secret's last symbol to a different one (a fixed
    // replacement would equal the real token when it already ends so).
    let forged = {
        let (head, last) = admin.split_at(admin.len() - 1);
        format!("{head}{}", if last == "X" { "Y" } else { "X" })
    };
    assert_ne!(forged, admin);
    let st = LicenseServiceClient::new(channel.clone())
        .get_license(with_token(
            pb::GetLicenseRequest {
                license_key: key.clone(),
            },
            &forged,
        ))
        .await
        .expect_err("forged token");
    assert_eq!(st.code(), Code::Unauthenticated);
    let st = LicenseServiceClient::new(channel.clone())
        .get_license(with_token(
            pb::GetLicenseRequest {
                license_key: key.clone(),
            },
            &format!("{admin}{admin}"),
        ))
        .await
        .expect_err("oversized token");
    assert_eq!(st.code(), Code::Unauthenticated);
    let st = support_licenses
        .issue_license(license_req("ACME", 1, 1))
        .await
        .expect_err("support issues");
    assert_eq!(st.code(), Code::PermissionDenied);
    let st = support_licenses
        .revoke_license(pb::RevokeLicenseRequest {
            license_key: key.clone(),
            reason: "no".into(),
            request_id: String::new(),
        })
        .await
        .expect_err("support revokes");
    assert_eq!(st.code(), Code::PermissionDenied);

    let mistyped = {
        let last = key.chars().last().unwrap();
        let other = if last == 'A' { 'B' } else { 'A' };
        format!("{}{other}", &key[..key.len() - 1])
    };
    let st = activation
        .validate(pb::ValidateRequest {
            license_key: mistyped.clone(),
            fingerprint: String::new(),
            client_version: String::new(),
            certificate_expires_at: None,
        })
        .await
        .expect_err("mistyped key");
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    let unknown_key = LicenseKey::generate(
        &licensd::domain::ProductCode::parse("ACME").unwrap(),
        licensd::domain::license::LicenseKind::Standard,
    )
    .to_string();
    let st = licenses
        .get_license(pb::GetLicenseRequest {
            license_key: unknown_key.clone(),
        })
        .await
        .expect_err("unknown key");
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
    licenses
        .suspend_license(pb::SuspendLicenseRequest {
            license_key: other_key.clone(),
            reason: "unpaid".into(),
            request_id: String::new(),
        })
        .await
        .expect("suspend");
    let st = activation
        .activate(activate(&other_key, "ws-9"))
        .await
        .expect_err("suspended");
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    activation
        .deactivate(pb::DeactivateRequest {
            license_key: key.clone(),
            fingerprint: "ws-2".into(),
        })
        .await
        .expect("deactivate");
    licenses
        .list_license_events(pb::ListLicenseEventsRequest {
            license_key: key.clone(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .expect("history");
    drop(channel);

    let mistyped_secret = Secret {
        what: "license key (mistyped by one character)".into(),
        forms: vec![mistyped.clone(), mistyped.replace('-', "")],
    };
    let secrets = vec![
        key_secret("(activated and renewed)", &key),
        key_secret("(suspended)", &other_key),
        key_secret("(unknown)", &unknown_key),
        mistyped_secret,
        code_secret("(redeemed)", &code),
        code_secret("(voided)", &voided),
        code_secret("(never issued)", &unknown_code),
        token_secret("admin", &admin),
        token_secret("support", &support),
    ];
    (secrets, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("licensd.db").display());
    let server = start(&db_url);
    let (secrets, key) = story(&server.addr, &db_url).await;
    let (answers, cli_lines) = signing_story(&server.addr, &db_url, &key).await;
    let lines = server.stop();

    assert!(
        lines.iter().any(|l| l.contains("licensd stopped")),
        "the whole log was collected: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "RUST_LOG=debug took effect"
    );

    let mut leaks = leaks_in(&secrets, &lines, "stderr");
    // Also whatever other separators or case a line may use: compare with
    // the log folded to upper case without separators.
    let folded: Vec<String> = lines
        .iter()
        .map(|l| {
            l.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect::<String>()
                .to_uppercase()
        })
        .collect();
    for secret in &secrets {
        let Some(core) = secret.forms.iter().find(|f| !f.contains('-')) else {
            continue;
        };
        let core = core.to_uppercase();
        // The part of a key the shortened form does not show; a code's random part.
        let hidden = &core[core.len() - 20..];
        for (n, line) in folded.iter().enumerate() {
            if line.contains(hidden) && !leaks.iter().any(|l| l.contains(&lines[n])) {
                leaks.push(format!(
                    "{} (folded: {hidden}) in stderr line {}: {}",
                    secret.what,
                    n + 1,
                    lines[n]
                ));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets leaked into the logs:\n{}",
        leaks.join("\n")
    );

    // The private signing keys, as the database holds them: the one made
    // at the first start and the one `rotate` made.
    let store = common::TestDb::at(&db_url).open().await;
    let stored = store.signing_keys().await.expect("signing keys");
    store.close().await;
    assert_eq!(stored.len(), 2, "the first key and the rotated-in one");
    let key_secrets: Vec<Secret> = stored
        .iter()
        .map(|k| signing_key_secret(&k.kid, &k.private_der))
        .collect();
    leaks.extend(leaks_in(&key_secrets, &lines, "stderr"));
    leaks.extend(leaks_in(
        &key_secrets,
        &cli_lines,
        "`signing-key rotate`'s output",
    ));
    leaks.extend(leaks_in(&key_secrets, &answers, "an answer"));
    assert!(
        leaks.is_empty(),
        "a private signing key leaked:\n{}",
        leaks.join("\n")
    );

    let redacted = LicenseKey::parse(&key).unwrap().redacted();
    assert!(
        lines.iter().any(|l| l.contains(&redacted)),
        "the shortened key {redacted:?} never appears in the logs: logging went missing?\n{}",
        lines.join("\n")
    );
}

/// Each form of each secret found in `texts` (`place` names them).
fn leaks_in(secrets: &[Secret], texts: &[String], place: &str) -> Vec<String> {
    let mut leaks = Vec::new();
    for secret in secrets {
        for form in &secret.forms {
            for (n, text) in texts.iter().enumerate() {
                if text.contains(form.as_str()) {
                    leaks.push(format!(
                        "{} as {form:?} in {place} line {}: {text}",
                        secret.what,
                        n + 1
                    ));
                }
            }
        }
    }
    leaks
}
