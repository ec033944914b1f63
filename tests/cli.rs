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
