//! The README's grpcurl walk-through, run as written (against a server on a
//! free port instead of 50051), so that a newcomer gets the answers it shows.

mod common;

use std::process::Command;

fn walkthrough_commands() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Walk-through with grpcurl")
        .expect("walk-through section");
    // Up to the next section: the later ones' `sh` blocks (the bench,
    // `createdb`, `licensd serve` on a replica) are not the walk-through's.
    let end = start + readme[start..].find("\n## ").expect("next section");
    let mut script = String::new();
    let mut in_sh = false;
    for line in readme[start..end].lines() {
        match line.trim_end() {
            "```sh" => in_sh = true,
            "```" if in_sh => in_sh = false,
            l if in_sh => {
                script.push_str(l);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_gives_the_answers_it_shows() {
    if Command::new("grpcurl").arg("-version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcurl is required in CI"
        );
        common::loud_notice("SKIPPED: grpcurl not found; the README walk-through was not run");
        return;
    }
    let s = common::TestServer::start().await;
    // The walk-through's server runs from the repository with its default
    // database; here the test server's address and database stand in.
    let script = walkthrough_commands()
        .replace("127.0.0.1:50051", &s.addr.to_string())
        .replace(
            "cargo run --release -q -- token create",
            &format!(
                "{} token create --database-url {}",
                env!("CARGO_BIN_EXE_licensd"),
                s.db_url
            ),
        );
    assert!(script.contains(" token create --database-url "), "{script}");
    assert!(
        script.contains("call ActivationService/RedeemRenewalCode"),
        "{script}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .current_dir(dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for expected in [
        "licensing.v1.ActivationService",
        "\"renewalBasis\": \"RENEWAL_BASIS_FROM_EXPIRY\"",
        "\"validity\": \"VALIDITY_VALID\"",
        "\"updateAvailable\": true",
        "\"state\": \"RENEWAL_CODE_STATE_UNREDEEMED\"",
        "Code: FailedPrecondition",
        "\"reason\":\"CLIENT_VERSION_OUTDATED\"",
        "\"renewalCount\": 1",
        "\"previousExpiresAt\"",
        "\"type\": \"renewal_refused\"",
        "\"type\": \"renewed\"",
    ] {
        assert!(
            text.contains(expected),
            "missing {expected:?} in walk-through output:\n{text}"
        );
    }
    s.stop().await;
}
