mod common;

#[tokio::test]
async fn server_starts_and_answers() {
    let mut s = common::TestServer::start().await;
    s.product("ACME", "1.0.0").await;
    let l = s.issue(common::license_req("ACME", 1, 1)).await;
    assert!(l.key.starts_with("ACME-"));
    s.stop().await;
}
