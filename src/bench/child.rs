//! The server under test as a child process (the same `licensd` binary), and
//! what `/proc` tells about it.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::BenchError;

/// The kernel's clock ticks per second for `/proc/<pid>/stat` times
/// (`USER_HZ`, part of the kernel ABI: 100 on every architecture Linux runs
/// this service on).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Log lines kept to explain a server that failed to start.
const KEPT_LINES: usize = 20;

/// A `licensd serve` child, killed when dropped.
pub struct ServerChild {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// The address it listens on.
    pub addr: String,
    /// From spawn to health SERVING.
    pub start_to_serving: Duration,
    /// When its writes reach the disk, as its log says (`synchronous=full`,
    /// `synchronous_commit=on`, …).
    pub durability: String,
    /// Set, to the time since spawn, when the log says the validation cache
    /// has loaded.
    cache_loaded: tokio::sync::watch::Receiver<Option<Duration>>,
}

impl ServerChild {
    /// Starts `licensd serve` on a free port against `database_url` (with the
    /// abuse limits off, which would otherwise throttle a load generator on
    /// one address) and waits until its health service says SERVING.
    pub async fn start(
        database_url: &str,
        validate_ceiling: bool,
        extra_args: &[String],
    ) -> Result<ServerChild, BenchError> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--activation-rate-per-ip",
            "0",
            "--validate-rate-per-ip",
            "0",
            "--code-failures-per-hour",
            "0",
            "--database-url",
            database_url,
        ])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        if validate_ceiling {
            // Its Validate never reads the store: no cache to load.
            cmd.args(["--validate-ceiling", "--no-validate-cache"]);
        }
        let spawned = Instant::now();
        let mut child = cmd.spawn()?;
        let pid = child.id().ok_or("the server exited at once")?;
        let stderr = child.stderr.take().expect("piped");

        // Read the log until the "licensd serving" line names the address,
        // then keep draining it (a full pipe would stall the server).
        let kept = Arc::new(Mutex::new(VecDeque::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<(String, String)>();
        let (loaded_tx, cache_loaded) = tokio::sync::watch::channel(None);
        tokio::spawn({
            let kept = kept.clone();
            async move {
                let mut lines = BufReader::new(stderr).lines();
                let mut addr_tx = Some(addr_tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("validation cache loaded") {
                        let _ = loaded_tx.send(Some(spawned.elapsed()));
                    }
                    if let Some(tx) = addr_tx.take() {
                        match serving_addr(&line) {
                            Some(addr) => {
                                let _ = tx.send(addr);
                            }
                            None => addr_tx = Some(tx),
                        }
                    }
                    let mut kept = kept.lock().expect("not poisoned");
                    if kept.len() == KEPT_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line);
                }
            }
        });
        let (addr, durability) = match tokio::time::timeout(Duration::from_secs(60), addr_rx).await
        {
            Ok(Ok(serving)) => serving,
            _ => {
                let _ = child.start_kill();
                let log = kept
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(format!("the server did not start; its log:\n{log}").into());
            }
        };
        wait_serving(&addr, Duration::from_secs(30)).await?;
        Ok(ServerChild {
            child,
            pid,
            addr,
            start_to_serving: spawned.elapsed(),
            durability,
            cache_loaded,
        })
    }

    /// Waits until the server's validation cache has loaded; returns the
    /// time from spawn.
    pub async fn wait_cache_loaded(&self, within: Duration) -> Result<Duration, BenchError> {
        let mut rx = self.cache_loaded.clone();
        match tokio::time::timeout(within, rx.wait_for(Option::is_some)).await {
            Ok(Ok(at)) => Ok(at.expect("waited for Some")),
            _ => Err(format!("the validation cache did not load within {within:?}").into()),
        }
    }

    /// What `/proc` says about the server now.
    pub fn sample(&self) -> ProcSample {
        ProcSample::of(self.pid)
    }

    /// Kills the server and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The address in a `{"message":"licensd serving","addr":…}` JSON log line.
fn serving_addr(line: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("message")?.as_str()? != "licensd serving" {
        return None;
    }
    let durability = v
        .get("durability")
        .and_then(|d| d.as_str())
        .unwrap_or("unknown");
    Some((v.get("addr")?.as_str()?.to_string(), durability.to_string()))
}

/// Opens a plaintext HTTP/2 connection to `addr`.
pub async fn connect(addr: &str) -> Result<Channel, BenchError> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Polls grpc.health.v1 Check until SERVING.
pub async fn wait_serving(addr: &str, within: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + within;
    loop {
        let status = match connect(addr).await {
            Ok(ch) => HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()
                .map(|r| r.into_inner().status),
            Err(_) => None,
        };
        if status == Some(ServingStatus::Serving as i32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{addr} is not SERVING after {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// CPU time and memory of a process at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// User + system CPU seconds since it started.
    pub cpu_seconds: f64,
    /// The CPU seconds of its live threads, by what they do.
    pub threads: ThreadCpu,
    /// Peak resident set (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Resident set (VmRSS), MiB.
    pub rss_mib: f64,
}

/// CPU seconds in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct UserKernel {
    /// In user space.
    pub user: f64,
    /// In the kernel (system calls, page faults, the I/O they start).
    pub kernel: f64,
}

impl UserKernel {
    fn minus(self, earlier: UserKernel) -> UserKernel {
        UserKernel {
            user: (self.user - earlier.user).max(0.0),
            kernel: (self.kernel - earlier.kernel).max(0.0),
        }
    }
}

/// A server's CPU by thread, told apart by the threads' names: where a
/// write's time goes, and which of it is the kernel's (on SQLite the
/// writer's and the checkpointer's kernel time is mostly the disk's
/// writes and syncs, the part that moves most from one day to the next).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ThreadCpu {
    /// Tokio's threads: the gRPC calls, and blocking tasks (the validation
    /// cache's reads of changed licenses).
    pub tokio: UserKernel,
    /// The SQLite writer's thread ([`crate::store::sqlite::WRITER_THREAD`]).
    pub writer: UserKernel,
    /// The SQLite checkpointer's thread
    /// ([`crate::store::sqlite::CHECKPOINT_THREAD`]).
    pub checkpointer: UserKernel,
}

impl ThreadCpu {
    /// What was spent between `earlier` and this (threads that ended
    /// meanwhile are not counted).
    pub fn minus(self, earlier: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            tokio: self.tokio.minus(earlier.tokio),
            writer: self.writer.minus(earlier.writer),
            checkpointer: self.checkpointer.minus(earlier.checkpointer),
        }
    }

    /// Reads `/proc/<pid>/task/*/stat`.
    fn of(pid: u32) -> ThreadCpu {
        let mut out = ThreadCpu::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return out;
        };
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let Some(group) = out.group(thread_name(&stat)) else {
                continue;
            };
            let (user, kernel) = cpu_ticks(&stat);
            group.user += user as f64 / CLOCK_TICKS_PER_SEC;
            group.kernel += kernel as f64 / CLOCK_TICKS_PER_SEC;
        }
        out
    }

    fn group(&mut self, name: &str) -> Option<&mut UserKernel> {
        use crate::store::sqlite::{CHECKPOINT_THREAD, WRITER_THREAD};
        match name {
            WRITER_THREAD => Some(&mut self.writer),
            CHECKPOINT_THREAD => Some(&mut self.checkpointer),
            n if n.starts_with("tokio") => Some(&mut self.tokio),
            _ => None,
        }
    }
}

impl ProcSample {
    /// Reads `/proc/<pid>/stat`, `/proc/<pid>/status` and the threads'
    /// `stat` (zeros where they cannot be read, e.g. not on Linux).
    pub fn of(pid: u32) -> ProcSample {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let (user, kernel) = cpu_ticks(&stat);
        ProcSample {
            cpu_seconds: (user + kernel) as f64 / CLOCK_TICKS_PER_SEC,
            threads: ThreadCpu::of(pid),
            peak_rss_mib: status_kib(&status, "VmHWM:") as f64 / 1024.0,
            rss_mib: status_kib(&status, "VmRSS:") as f64 / 1024.0,
        }
    }
}

/// A `/proc/.../stat` line's command name (field 2, in parentheses; it
/// may hold spaces and parentheses itself, so it ends at the last `)`) and
/// what follows it.
fn split_stat(stat: &str) -> Option<(&str, &str)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, name) = head.split_once('(')?;
    Some((name, rest))
}

/// The command name of a `/proc/.../stat` line ("" if it has none).
fn thread_name(stat: &str) -> &str {
    split_stat(stat).map_or("", |(name, _)| name)
}

/// (utime, stime), fields 14 and 15 of a `/proc/<pid>/stat` line.
fn cpu_ticks(stat: &str) -> (u64, u64) {
    let Some((_, rest)) = split_stat(stat) else {
        return (0, 0);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    (field(14).unwrap_or(0), field(15).unwrap_or(0))
}

/// A `Name:   1234 kB` value of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `/proc/loadavg`'s three load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".into())
}

/// `GET /metrics` of a server on 127.0.0.1:`port`: how many series it holds.
pub async fn scrape_metrics(port: u16) -> Result<usize, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text))
        .await
        .map_err(|_| "the metrics listener did not answer within 10 s")??;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("metrics: {}", text.lines().next().unwrap_or("no answer")).into());
    }
    Ok(text.lines().filter(|l| l.starts_with("licensd_")).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (licensd (x) y) S 1 4242 4242 0 -1 4194560 1207 0 0 0 150 25 0 0 20 0 6 0";
        assert_eq!(cpu_ticks(stat), (150, 25));
        assert_eq!(thread_name(stat), "licensd (x) y");
    }

    #[test]
    fn status_values_are_read_in_kib() {
        let status = "Name:\tlicensd\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), 20480);
        assert_eq!(status_kib(status, "VmRSS:"), 10240);
    }

    #[test]
    fn the_serving_line_gives_the_address_and_durability() {
        let line = r#"{"timestamp":"x","level":"INFO","message":"licensd serving","addr":"127.0.0.1:4000","durability":"synchronous=full","target":"licensd::server"}"#;
        let serving = |addr: &str, durability: &str| Some((addr.into(), durability.into()));
        assert_eq!(
            serving_addr(line),
            serving("127.0.0.1:4000", "synchronous=full")
        );
        let older = r#"{"message":"licensd serving","addr":"127.0.0.1:4000"}"#;
        assert_eq!(serving_addr(older), serving("127.0.0.1:4000", "unknown"));
        assert_eq!(serving_addr(r#"{"message":"other"}"#), None);
        assert_eq!(serving_addr("not json"), None);
    }

    #[test]
    fn threads_are_grouped_by_name() {
        let line = "4242 (sqlite-checkpt) S 1 2 3 4 5 6 7 8 9 10 1234 56 0 0 20 0 1";
        assert_eq!(thread_name(line), "sqlite-checkpt");
        assert_eq!(cpu_ticks(line), (1234, 56));
        let mut cpu = ThreadCpu::default();
        for name in [
            "sqlite-writer",
            "sqlite-checkpt",
            "tokio-rt-worker",
            "other",
        ] {
            if let Some(g) = cpu.group(name) {
                g.user += 1.0;
            }
        }
        assert_eq!(
            (cpu.tokio.user, cpu.writer.user, cpu.checkpointer.user),
            (1.0, 1.0, 1.0)
        );
    }

    #[test]
    fn this_process_has_a_cpu_time_and_a_resident_set() {
        if cfg!(target_os = "linux") {
            let s = ProcSample::of(std::process::id());
            assert!(s.peak_rss_mib > 0.0);
        }
    }
}
