//! Raw bytes over HTTP/2 (docs/api.md, Errors): gRPC requests built by
//! hand with the `h2` client — malformed protobuf inside a valid gRPC frame,
//! a length prefix claiming more bytes than sent, a 100 MB declared length, a
//! compressed-flag frame without negotiated compression, a message over the
//! 64 KiB limit — and garbage that is not HTTP/2 at all.
//!
//! Each must get a clean gRPC error (`grpc-status` present, not OK, and not
//! INTERNAL: a caller's mistake is never INTERNAL), the connection must keep
//! serving well-formed calls, and afterwards the server still answers a normal
//! Validate through the ordinary client.
//!
//! Every case is its own test so that a failing one names the case. Run with
//! `--nocapture` to see the observed codes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{TestServer, license_req};
use licensd::proto as pb;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VALIDATE: &str = "/licensing.v1.ActivationService/Validate";
const ACTIVATE: &str = "/licensing.v1.ActivationService/Activate";
const REDEEM: &str = "/licensing.v1.ActivationService/RedeemRenewalCode";
const ISSUE_LICENSE: &str = "/licensing.v1.LicenseService/IssueLicense";
const CREATE_PRODUCT: &str = "/licensing.v1.ProductService/CreateProduct";
const UPDATE_PRODUCT: &str = "/licensing.v1.ProductService/UpdateProduct";
/// The server's limit (src/server.rs `MAX_MESSAGE_BYTES`).
const LIMIT: usize = licensd::server::MAX_MESSAGE_BYTES;
const WAIT: Duration = Duration::from_secs(10);

/// A gRPC length-prefixed message: compressed flag, 4-byte big-endian length.
fn frame(flag: u8, declared_len: u32, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(flag);
    b.put_u32(declared_len);
    b.put_slice(body);
    b.freeze()
}

fn msg_frame(body: &[u8]) -> Bytes {
    frame(0, body.len() as u32, body)
}

/// What came back for one raw request.
#[derive(Debug, Clone)]
struct Outcome {
    http_status: u16,
    grpc_status: Option<i32>,
    grpc_message: String,
    /// Where grpc-status was found: "headers" (trailers-only) or "trailers".
    found_in: &'static str,
    body_bytes: usize,
}

impl Outcome {
    fn code_name(&self) -> String {
        match self.grpc_status {
            Some(c) => format!("{c} {:?}", tonic::Code::from_i32(c)),
            None => "no grpc-status".into(),
        }
    }
}

/// An HTTP/2 connection (prior knowledge) to the server.
struct Conn {
    addr: SocketAddr,
    send: h2::client::SendRequest<Bytes>,
    token: Option<String>,
}

impl Conn {
    async fn open(addr: SocketAddr, token: Option<String>) -> Conn {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        tcp.set_nodelay(true).unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { addr, send, token }
    }

    /// Sends `chunks` (each a DATA frame; the last one ends the stream if
    /// `end_stream`) to `path` and reads the answer.
    async fn call(&mut self, path: &str, chunks: Vec<Bytes>, end_stream: bool) -> Outcome {
        tokio::time::timeout(WAIT, self.call_inner(path, chunks, end_stream))
            .await
            .unwrap_or_else(|_| panic!("no answer within {WAIT:?} for {path}"))
    }

    async fn call_inner(&mut self, path: &str, chunks: Vec<Bytes>, end_stream: bool) -> Outcome {
        let send = self.send.clone().ready().await.expect("connection ready");
        self.send = send;
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(()).unwrap();
        let no_body = chunks.is_empty() && end_stream;
        let (response, mut stream) = self
            .send
            .send_request(req, no_body)
            .expect("send request headers");
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            // The server may answer (and reset the stream) before it has read
            // everything; a refused send is fine, the answer is what counts.
            if stream.send_data(chunk, end_stream && i + 1 == n).is_err() {
                break;
            }
        }
        let response = response.await.expect("response headers");
        let (parts, mut body) = response.into_parts();
        let header = |h: &http::HeaderMap, name: &str| {
            h.get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let mut out = Outcome {
            http_status: parts.status.as_u16(),
            grpc_status: header(&parts.headers, "grpc-status").and_then(|s| s.parse().ok()),
            grpc_message: header(&parts.headers, "grpc-message")
                .map(|m| percent_decode(&m))
                .unwrap_or_default(),
            found_in: "headers",
            body_bytes: 0,
        };
        if out.grpc_status.is_some() {
            return out;
        }
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(c) => {
                    out.body_bytes += c.len();
                    let _ = body.flow_control().release_capacity(c.len());
                }
                Err(_) => break,
            }
        }
        if let Ok(Some(trailers)) = body.trailers().await {
            out.grpc_status = header(&trailers, "grpc-status").and_then(|s| s.parse().ok());
            out.grpc_message = header(&trailers, "grpc-message")
                .map(|m| percent_decode(&m))
                .unwrap_or_default();
            out.found_in = "trailers";
        }
        out
    }

    /// A well-formed Validate on this same connection answers OK.
    async fn assert_still_serving(&mut self, key: &str) {
        let body = pb::ValidateRequest {
            license_key: key.into(),
            ..Default::default()
        }
        .encode_to_vec();
        let out = self.call(VALIDATE, vec![msg_frame(&body)], true).await;
        assert_eq!(
            out.grpc_status,
            Some(0),
            "the connection no longer serves a well-formed Validate: {out:?}"
        );
        assert!(
            out.body_bytes > 5,
            "Validate answered without a message: {out:?}"
        );
    }
}

/// A server with a product and a license, and the license key.
async fn seeded() -> (TestServer, String) {
    let mut s = TestServer::start().await;
    s.product("RAWT", "1.0.0").await;
    let license = s.issue(license_req("RAWT", 2, 1)).await;
    (s, license.key)
}

/// The ordinary client still gets a normal answer.
async fn assert_server_alive(s: &mut TestServer, key: &str) {
    let v = s
        .activation
        .validate(pb::ValidateRequest {
            license_key: key.into(),
            ..Default::default()
        })
        .await
        .expect("the server still answers Validate")
        .into_inner();
    assert_eq!(v.validity, pb::Validity::Valid as i32, "{v:?}");
}

/// The clean-error assertion shared by every case.
#[track_caller]
fn assert_clean_error(case: &str, out: &Outcome) {
    let status = out.grpc_status.unwrap_or_else(|| {
        panic!(
            "{case}: no grpc-status in the answer (HTTP {}): {out:?}",
            out.http_status
        )
    });
    assert_eq!(
        out.http_status, 200,
        "{case}: gRPC errors travel in HTTP 200: {out:?}"
    );
    assert_ne!(
        status, 0,
        "{case}: a malformed request was answered OK: {out:?}"
    );
    assert_ne!(
        status, 2,
        "{case}: UNKNOWN for a caller's mistake (docs/api.md, Errors): {out:?}"
    );
    assert_ne!(
        status, 13,
        "BUG (docs/api.md, Errors: never INTERNAL for a caller's mistake) — {case} was \
         answered 13 INTERNAL with grpc-message {:?}. This status comes from tonic's own \
         request decoding, before any licensd code runs; the server must answer it as \
         INVALID_ARGUMENT (or another non-INTERNAL code) instead. Full answer: {out:?}",
        out.grpc_message
    );
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn report(case: &str, outcomes: &[(String, Outcome)]) {
    let mut text = format!("raw case {case}:\n");
    for (what, out) in outcomes {
        text.push_str(&format!(
            "  {what:<48} -> {} ({}; {:?})\n",
            out.code_name(),
            out.found_in,
            out.grpc_message
        ));
    }
    eprint!("{text}");
}

/// Runs every (label, path, body) and checks the answers only after all of
/// them ran, so the report shows every observed code.
async fn run_bodies(
    case: &str,
    conn: &mut Conn,
    key: &str,
    bodies: Vec<(String, &str, Vec<Bytes>, bool)>,
) {
    let mut outcomes = Vec::new();
    for (label, path, chunks, end) in bodies {
        let out = conn.call(path, chunks, end).await;
        outcomes.push((
            format!("{label} @ {}", path.rsplit('/').next().unwrap()),
            out,
        ));
        conn.assert_still_serving(key).await;
    }
    report(case, &outcomes);
    for (label, out) in &outcomes {
        assert_clean_error(&format!("{case}: {label}"), out);
    }
}

/// Protobuf bodies that do not decode.
fn malformed_protobuf() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = vec![
        ("truncated length varint".into(), vec![0x0a, 0xff, 0xff]),
        (
            "length varint longer than 10 bytes".into(),
            vec![
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
        (
            "string field sent as varint (wrong wire type)".into(),
            vec![0x08, 0x01],
        ),
        (
            "string field sent as fixed32 (wrong wire type)".into(),
            vec![0x0d, 1, 2, 3, 4],
        ),
        (
            "length-delimited longer than the body".into(),
            vec![0x0a, 0x10, b'a', b'b'],
        ),
        (
            "length-delimited length = 2^32".into(),
            vec![0x0a, 0x80, 0x80, 0x80, 0x80, 0x10],
        ),
        (
            "invalid UTF-8 in a string field".into(),
            vec![0x0a, 0x02, 0xff, 0xfe],
        ),
        ("field number 0".into(), vec![0x00, 0x01]),
        ("wire type 6 (invalid)".into(), vec![0x0e, 0x01]),
        ("wire type 7 (invalid)".into(), vec![0x0f, 0x01]),
        ("unterminated group (start group)".into(), vec![0x0b]),
        ("stray end group".into(), vec![0x0c]),
        ("truncated tag".into(), vec![0x80]),
        ("truncated fixed64".into(), vec![0x09, 1, 2, 3]),
    ];
    // Random bytes (fixed seeds: reproducible), most of which do not decode.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..12 {
        let len = 1 + (i * 7) % 64;
        let bytes = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect::<Vec<u8>>();
        if pb::ValidateRequest::decode(&bytes[..]).is_err() {
            v.push((format!("random bytes #{i} ({len} bytes)"), bytes));
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_protobuf_gets_a_clean_error() {
    let (mut s, key) = seeded().await;
    let mut conn = Conn::open(s.addr, Some(s.admin_token.clone())).await;
    let mut bodies = Vec::new();
    for (label, body) in malformed_protobuf() {
        bodies.push((label, VALIDATE, vec![msg_frame(&body)], true));
    }
    // The same on other methods, mutations included (the admin token gets
    // the billing/admin ones past authentication, to the decoding).
    for path in [
        ACTIVATE,
        REDEEM,
        ISSUE_LICENSE,
        CREATE_PRODUCT,
        UPDATE_PRODUCT,
    ] {
        for (label, body) in malformed_protobuf().into_iter().take(7) {
            bodies.push((label, path, vec![msg_frame(&body)], true));
        }
    }
    run_bodies("(a) malformed protobuf", &mut conn, &key, bodies).await;
    assert_server_alive(&mut s, &key).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_length_prefix_longer_than_the_body_gets_a_clean_error() {
    let (mut s, key) = seeded().await;
    let mut conn = Conn::open(s.addr, Some(s.admin_token.clone())).await;
    let good = pb::ValidateRequest {
        license_key: key.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let bodies = vec![
        (
            "claims 100 bytes, sends 10, END_STREAM".to_string(),
            VALIDATE,
            vec![frame(0, 100, &good[..10])],
            true,
        ),
        (
            "claims len+1 of a valid message, END_STREAM".into(),
            VALIDATE,
            vec![frame(0, good.len() as u32 + 1, &good)],
            true,
        ),
        (
            "only 3 bytes of the 5-byte prefix, END_STREAM".into(),
            VALIDATE,
            vec![Bytes::from_static(&[0, 0, 0])],
            true,
        ),
        (
            "valid message then a partial second prefix".into(),
            VALIDATE,
            vec![msg_frame(&good), Bytes::from_static(&[0, 0])],
            true,
        ),
        (
            "claims 1000 bytes over two DATA frames, 20 sent".into(),
            ISSUE_LICENSE,
            vec![frame(0, 1000, &[0x0a; 10]), Bytes::from_static(&[0x0a; 10])],
            true,
        ),
        (
            "no message at all (empty body, END_STREAM)".into(),
            VALIDATE,
            vec![],
            true,
        ),
    ];
    run_bodies(
        "(b) length prefix longer than the body",
        &mut conn,
        &key,
        bodies,
    )
    .await;
    assert_server_alive(&mut s, &key).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_declared_100_mb_message_gets_a_clean_error() {
    let (mut s, key) = seeded().await;
    let mut conn = Conn::open(s.addr, Some(s.admin_token.clone())).await;
    // The stream stays open: the server must answer from the prefix alone
    // instead of waiting for (or buffering) 100 MB.
    let bodies = vec![
        (
            "declares 100 MB, sends 1 KiB, stream left open".to_string(),
            VALIDATE,
            vec![frame(0, 100 * 1024 * 1024, &[0u8; 1024])],
            false,
        ),
        (
            "declares 4 GiB - 1, sends nothing more, END_STREAM".into(),
            VALIDATE,
            vec![frame(0, u32::MAX, &[])],
            true,
        ),
        (
            "declares 100 MB on IssueLicense, stream left open".into(),
            ISSUE_LICENSE,
            vec![frame(0, 100 * 1024 * 1024, &[0u8; 16])],
            false,
        ),
    ];
    run_bodies("(c) declared 100 MB message", &mut conn, &key, bodies).await;
    assert_server_alive(&mut s, &key).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_compressed_flag_without_negotiated_compression_gets_a_clean_error() {
    let (mut s, key) = seeded().await;
    let mut conn = Conn::open(s.addr, None).await;
    let good = pb::ValidateRequest {
        license_key: key.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let bodies = vec![
        (
            "compressed flag 1, no grpc-encoding".to_string(),
            VALIDATE,
            vec![frame(1, good.len() as u32, &good)],
            true,
        ),
        (
            "compressed flag 2 (undefined)".into(),
            VALIDATE,
            vec![frame(2, good.len() as u32, &good)],
            true,
        ),
        (
            "compressed flag 0xff (undefined)".into(),
            VALIDATE,
            vec![frame(0xff, good.len() as u32, &good)],
            true,
        ),
    ];
    run_bodies("(d) compressed flag", &mut conn, &key, bodies).await;
    assert_server_alive(&mut s, &key).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_message_over_64_kib_gets_a_clean_error() {
    let (mut s, key) = seeded().await;
    let mut conn = Conn::open(s.addr, Some(s.admin_token.clone())).await;
    // A well-formed ValidateRequest whose fingerprint alone is over the limit.
    let big = pb::ValidateRequest {
        license_key: key.clone(),
        fingerprint: "f".repeat(LIMIT + 10),
        client_version: String::new(),
        certificate_expires_at: None,
    }
    .encode_to_vec();
    assert!(big.len() > LIMIT);
    let just_over = vec![0u8; LIMIT + 1];
    // In several DATA frames of 16 KiB (the default maximum frame size).
    let chunked: Vec<Bytes> = {
        let f = msg_frame(&big);
        f.chunks(16 * 1024).map(Bytes::copy_from_slice).collect()
    };
    let bodies = vec![
        (
            format!("well-formed ValidateRequest of {} bytes", big.len()),
            VALIDATE,
            vec![msg_frame(&big)],
            true,
        ),
        (
            format!("{} zero bytes (limit + 1)", just_over.len()),
            VALIDATE,
            vec![msg_frame(&just_over)],
            true,
        ),
        (
            "the big message in 16 KiB DATA frames".into(),
            VALIDATE,
            chunked,
            true,
        ),
        (
            "over the limit on IssueLicense".into(),
            ISSUE_LICENSE,
            vec![msg_frame(&just_over)],
            true,
        ),
    ];
    run_bodies("(e) message over 64 KiB", &mut conn, &key, bodies).await;
    assert_server_alive(&mut s, &key).await;
    s.stop().await;
}

/// Writes `bytes` on a fresh TCP connection and waits for the server to
/// close it; returns what the server sent before closing.
async fn send_garbage(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.expect("tcp connect");
    // The server may close before everything is written.
    let _ = tcp.write_all(bytes).await;
    let _ = tcp.flush().await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept a garbage connection open for {WAIT:?} (got {} bytes)",
        got.len()
    );
    got
}

/// The HTTP/2 frames in `bytes` (as the server sent them), for the report.
fn h2_frames(mut bytes: &[u8]) -> String {
    let mut names = Vec::new();
    while bytes.len() >= 9 {
        let len =
            (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        let name = match bytes[3] {
            0x0 => "DATA".to_string(),
            0x1 => "HEADERS".into(),
            0x3 => "RST_STREAM".into(),
            0x4 => "SETTINGS".into(),
            0x6 => "PING".into(),
            0x7 => {
                let code = bytes
                    .get(13..17)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(u32::MAX);
                format!("GOAWAY(error {code:#x})")
            }
            0x8 => "WINDOW_UPDATE".into(),
            t => format!("type {t:#x}"),
        };
        names.push(name);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    if !bytes.is_empty() {
        names.push(format!("{} trailing bytes", bytes.len()));
    }
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_garbage_that_is_not_http2_is_closed() {
    let (mut s, key) = seeded().await;
    let mut random = Vec::with_capacity(4096);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        random.push((x >> 40) as u8);
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random),
        (
            "an HTTP/1.1 request",
            b"POST /licensing.v1.ActivationService/Validate HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\ncontent-length: 5\r\n\r\n\0\0\0\0\0".to_vec(),
        ),
        ("a TLS ClientHello prefix", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]),
        (
            "the HTTP/2 preface, then garbage frames",
            [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), vec![0xff; 512]].concat(),
        ),
        ("a bare NUL", vec![0]),
    ];
    let mut text = String::from("raw case (f) non-HTTP/2 garbage:\n");
    for (label, bytes) in &cases {
        let got = send_garbage(s.addr, bytes).await;
        text.push_str(&format!(
            "  {label:<40} -> closed by the server after sending {} bytes: {}\n",
            got.len(),
            h2_frames(&got)
        ));
        assert_server_alive(&mut s, &key).await;
    }
    eprint!("{text}");
    // And a fresh raw HTTP/2 connection still works.
    let mut conn = Conn::open(s.addr, None).await;
    conn.assert_still_serving(&key).await;
    assert_server_alive(&mut s, &key).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_is_unimplemented() {
    let (mut s, key) = seeded().await;
    let mut conn = Conn::open(s.addr, Some(s.admin_token.clone())).await;
    let bodies = vec![
        (
            "unknown method of a known service".to_string(),
            "/licensing.v1.ActivationService/Nope",
            vec![msg_frame(&[])],
            true,
        ),
        (
            "unknown service".into(),
            "/licensing.v9.Nope/Validate",
            vec![msg_frame(&[])],
            true,
        ),
    ];
    let mut outcomes = Vec::new();
    for (label, path, chunks, end) in bodies {
        outcomes.push((label, conn.call(path, chunks, end).await));
    }
    report("unknown method", &outcomes);
    for (label, out) in &outcomes {
        assert_eq!(
            out.grpc_status,
            Some(12),
            "{label}: expected UNIMPLEMENTED: {out:?}"
        );
    }
    conn.assert_still_serving(&key).await;
    assert_server_alive(&mut s, &key).await;
    s.stop().await;
}
