//! The `licensd` binary as an operator runs it: migrate, serve, and a clean
//! exit on SIGTERM/SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use licensd::proto as pb;
use licensd::proto::product_service_client::ProductServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_licensd");

#[test]
fn migrate_creates_the_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh.db");
    let out = Command::new(BIN)
        .args([
            "migrate",
            "--database-url",
            &format!("sqlite:{}", db.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
    // Migrating again is a no-op.
    let again = Command::new(BIN)
        .args(["migrate", "--database-url", &db.display().to_string()])
        .output()
        .unwrap();
    assert!(again.status.success());
}

#[test]
fn serve_refuses_a_database_url_it_cannot_use() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "mysql://nowhere/none",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported database URL"));
}

#[test]
fn serve_refuses_trusted_proxies_that_are_not_cidrs_from_a_flag_the_environment_or_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    std::fs::write(
        path.join("licensd.toml"),
        "trusted_proxies = \"10.0.0.0/8, lb-1\"\n",
    )
    .unwrap();
    let serve = ["serve", "--listen", "127.0.0.1:0"];
    let with = |extra: &[&'static str]| [&serve[..], extra].concat();
    for (args, envs, bad) in [
        (
            with(&["--trusted-proxies", "10.0.0.0/8,192.168.1.0/33"]),
            vec![],
            "192.168.1.0/33",
        ),
        (
            with(&[]),
            vec![("LICENSD_TRUSTED_PROXIES", "10.0.0.0/8;10.1.0.0/16")],
            "10.0.0.0/8;10.1.0.0/16",
        ),
        (with(&["--config", "licensd.toml"]), vec![], "lb-1"),
    ] {
        let (ok, _, err) = licensd_in(path, &args, &envs);
        assert!(!ok, "{args:?} {envs:?} started");
        assert!(err.contains("trusted") && err.contains(bad), "{err}");
    }
    assert!(!path.join("licensd.db").exists(), "nothing was opened");
}

/// `licensd token create` in `dir` (default database); returns stdout.
fn create_token(dir: &std::path::Path, role: &str, name: &str) -> String {
    let out = Command::new(BIN)
        .current_dir(dir)
        .args(["token", "create", "--role", role, "--name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end()
        .to_string()
}

#[test]
fn token_create_prints_only_the_token_and_list_and_revoke_manage_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = create_token(dir.path(), "billing", "billing-eu");
    assert!(
        licensd::domain::auth::Token::parse(&token).is_some(),
        "stdout was {token:?}"
    );
    assert!(!token.contains('\n'));

    let list = |dir: &std::path::Path| {
        let out = Command::new(BIN)
            .current_dir(dir)
            .args(["token", "list"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = list(dir.path());
    assert!(listed.contains("billing-eu\tbilling\t"), "{listed}");
    assert!(listed.contains("\tlive"), "{listed}");
    assert!(
        !listed.contains(&token[token.len() - 32..]),
        "secrets are never listed"
    );

    // A live name cannot be taken twice; a bad role is refused.
    let dup = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "token",
            "create",
            "--role",
            "support",
            "--name",
            "billing-eu",
        ])
        .output()
        .unwrap();
    assert!(!dup.status.success());
    let bad = Command::new(BIN)
        .current_dir(dir.path())
        .args(["token", "create", "--role", "root", "--name", "x"])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let revoke = Command::new(BIN)
        .current_dir(dir.path())
        .args(["token", "revoke", "billing-eu"])
        .output()
        .unwrap();
    assert!(revoke.status.success());
    assert!(list(dir.path()).contains("revoked"));
    let again = Command::new(BIN)
        .current_dir(dir.path())
        .args(["token", "revoke", "billing-eu"])
        .output()
        .unwrap();
    assert!(!again.status.success(), "nothing live to revoke");
    // The name is free again after revocation.
    create_token(dir.path(), "support", "billing-eu");
}

/// Kills the server if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

fn serve_then_signal(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .current_dir(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server log ends before serving")
            .unwrap();
        if line.contains("licensd serving") {
            let v = line.split("\"addr\":\"").nth(1).unwrap();
            break v.split('"').next().unwrap().to_string();
        }
    };
    // The default database file is created in the working directory, and
    // the first admin token is made with the CLI next to the running server.
    assert!(dir.path().join("licensd.db").exists());
    let token = create_token(dir.path(), "admin", "ops");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = ProductServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut req = tonic::Request::new(pb::CreateProductRequest {
            product: Some(pb::Product {
                code: "ACME".into(),
                ..Default::default()
            }),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.create_product(req).await.unwrap();
    });

    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "server did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("licensd stopped")),
        "{rest:?}"
    );
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    serve_then_signal("-TERM");
}

#[test]
fn serve_stops_cleanly_on_sigint() {
    serve_then_signal("-INT");
}

/// Runs `licensd ARGS` in `dir` with `envs`; returns (success, stderr).
fn licensd_in(
    dir: &std::path::Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (bool, String, String) {
    let out = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove("LICENSD_DATABASE_URL")
        .env_remove("LICENSD_CONFIG")
        .env_remove("LICENSD_LOG_FORMAT")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_config_file_sits_below_flags_and_environment_and_above_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    std::fs::write(
        path.join("licensd.toml"),
        "database_url = \"sqlite:from-file.db\"\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // The file's database, not the default licensd.db.
    let (ok, _, err) = licensd_in(
        path,
        &[
            "token",
            "create",
            "--role",
            "admin",
            "--name",
            "a",
            "--config",
            "licensd.toml",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(path.join("from-file.db").exists());
    assert!(!path.join("licensd.db").exists());
    // The environment beats the file (LICENSD_CONFIG names the file too).
    let (ok, _, err) = licensd_in(
        path,
        &["token", "create", "--role", "admin", "--name", "b"],
        &[
            ("LICENSD_CONFIG", "licensd.toml"),
            ("LICENSD_DATABASE_URL", "sqlite:from-env.db"),
        ],
    );
    assert!(ok, "{err}");
    assert!(path.join("from-env.db").exists());
    // The flag beats both.
    let (ok, _, err) = licensd_in(
        path,
        &[
            "token",
            "create",
            "--role",
            "admin",
            "--name",
            "c",
            "--database-url",
            "sqlite:from-flag.db",
        ],
        &[
            ("LICENSD_CONFIG", "licensd.toml"),
            ("LICENSD_DATABASE_URL", "sqlite:from-env.db"),
        ],
    );
    assert!(ok, "{err}");
    assert!(path.join("from-flag.db").exists());
    let (_, listed, _) = licensd_in(path, &["token", "list", "--config", "licensd.toml"], &[]);
    assert!(listed.starts_with("a\tadmin"), "{listed}");
    assert_eq!(listed.lines().count(), 1, "{listed}");
}

#[test]
fn a_bad_config_file_is_one_line_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let cases = [
        ("lsten = \"127.0.0.1:0\"\n", "unknown key `lsten`"),
        ("db_max_connections = \"many\"\n", "`db_max_connections`"),
        (
            "validate_cache_refresh_ms = 5\n",
            "`validate_cache_refresh_ms`",
        ),
        (
            "listen = [1, 2]\n",
            "`listen`: expected a string, an integer or a boolean",
        ),
        ("no_validate_cache = \"yes\"\n", "`no_validate_cache`"),
        ("metrics_listen = true\n", "`metrics_listen`"),
        ("listen = \n", "bad.toml:1"),
        (
            "validate_ceiling = true\n",
            "unknown key `validate_ceiling`",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(path.join("bad.toml"), text).unwrap();
        let (ok, _, err) = licensd_in(
            path,
            &[
                "serve",
                "--config",
                "bad.toml",
                "--database-url",
                "sqlite:x.db",
            ],
            &[],
        );
        assert!(!ok, "{text:?} was accepted");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{text:?}: {err}");
        assert!(
            lines[0].contains("bad.toml") && lines[0].contains(expected),
            "{text:?}: {err}"
        );
        assert!(!path.join("x.db").exists(), "nothing started for {text:?}");
    }
    let (ok, _, err) = licensd_in(path, &["migrate", "--config", "missing.toml"], &[]);
    assert!(!ok);
    assert!(err.contains("missing.toml"), "{err}");
}

#[test]
fn the_example_config_file_is_accepted() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/licensd.example.toml");
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = licensd_in(dir.path(), &["token", "list", "--config", example], &[]);
    assert!(ok, "{err}");
    assert!(dir.path().join("licensd.db").exists());
}

#[test]
fn a_failure_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = licensd_in(
        dir.path(),
        &["token", "revoke", "nobody", "--database-url", "sqlite:t.db"],
        &[],
    );
    assert!(!ok);
    assert_eq!(err.matches("no live token named").count(), 1, "{err}");
    assert_eq!(err.trim_end(), "licensd: no live token named \"nobody\"");
    // As one JSON log line with --log-format json.
    let (ok, _, err) = licensd_in(
        dir.path(),
        &[
            "--log-format",
            "json",
            "token",
            "revoke",
            "nobody",
            "--database-url",
            "sqlite:t.db",
        ],
        &[],
    );
    assert!(!ok);
    let failures: Vec<&str> = err.lines().filter(|l| l.contains("nobody")).collect();
    assert_eq!(failures.len(), 1, "{err}");
    assert!(
        failures[0].starts_with('{') && failures[0].contains("\"level\":\"ERROR\""),
        "{err}"
    );
}
