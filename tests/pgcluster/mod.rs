//! A throwaway PostgreSQL cluster for the tests that stop, restart or crash
//! the database (`tests/outage.rs`, `tests/chaos_soak.rs`): `initdb` and
//! `pg_ctl` from `pg_config --bindir`, on a free port, in a temporary
//! directory; as the `postgres` user when the test runs as root, which
//! `initdb` refuses. Never the machine's shared server.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::common::loud_notice;

/// A PostgreSQL cluster in a temporary directory on a free port, stopped
/// (`-m immediate`) and removed when dropped, also when the test fails.
pub struct PgCluster {
    bindir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    /// Run its programs as the `postgres` user (the test runs as root).
    runuser: bool,
    dir: tempfile::TempDir,
}

/// `cmd`'s trimmed stdout if it ran and succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl PgCluster {
    /// Creates and starts a cluster, or `None` (skipped, loudly, naming
    /// `what`) where `initdb` is not installed; in CI its absence fails the
    /// test.
    pub fn start(what: &str) -> Option<PgCluster> {
        let bindir = output(Command::new("pg_config").arg("--bindir"))
            .map(PathBuf::from)
            .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists());
        let Some(bindir) = bindir else {
            assert!(
                std::env::var_os("CI").is_none(),
                "initdb/pg_ctl (pg_config --bindir) must be installed in CI: {what} may not be skipped there"
            );
            loud_notice(&format!(
                "SKIPPED ({what}): no initdb/pg_ctl found via `pg_config --bindir`"
            ));
            return None;
        };
        let runuser = output(Command::new("id").arg("-u")).as_deref() == Some("0");
        let dir = tempfile::Builder::new()
            .prefix("licensd-pg")
            .tempdir()
            .expect("tempdir");
        if runuser {
            let uid = output(Command::new("id").args(["-u", "postgres"]))
                .and_then(|u| u.parse().ok())
                .expect("a `postgres` user to run initdb as (it refuses root)");
            let gid =
                output(Command::new("id").args(["-g", "postgres"])).and_then(|g| g.parse().ok());
            std::os::unix::fs::chown(dir.path(), Some(uid), gid)
                .expect("chown the cluster's directory");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = PgCluster {
            bindir,
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            port,
            runuser,
            dir,
        };
        let data = cluster.data.display().to_string();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        cluster.start_server();
        Some(cluster)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut cmd = if self.runuser {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let (data, log) = (
            self.data.display().to_string(),
            self.log.display().to_string(),
        );
        self.run(
            "pg_ctl",
            &[
                "start", "-D", &data, "-l", &log, "-w", "-t", "30", "-o", &options,
            ],
        );
    }

    /// `pg_ctl stop -m MODE`, waiting until it has stopped: `fast` rolls
    /// back open transactions and closes connections; `immediate` is a
    /// crash (the next start recovers from the WAL).
    pub fn stop_server(&self, mode: &str) {
        let data = self.data.display().to_string();
        self.run(
            "pg_ctl",
            &["stop", "-D", &data, "-m", mode, "-w", "-t", "30"],
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-D", &data, "-m", "immediate", "-w", "-t", "10"])
            .stderr(Stdio::null())
            .status();
    }
}
