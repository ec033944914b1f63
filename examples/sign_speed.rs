//! How long one Ed25519 signature of a certificate-sized message takes with
//! each library in the tree: `cargo run --release --example sign_speed`.
//! (Why certificates are signed with aws-lc-rs: see `src/signing.rs`.)

use std::hint::black_box;
use std::time::Instant;

fn main() {
    let message = vec![7u8; 600];
    let seed = [9u8; 32];
    let n = 20_000;
    let dalek = ed25519_dalek::SigningKey::from_bytes(&seed);
    let aws =
        aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("a 32-byte seed");
    let ring = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).expect("a 32-byte seed");
    let time = |name: &str, sign: &dyn Fn(&[u8]) -> Vec<u8>| {
        let start = Instant::now();
        for _ in 0..n {
            black_box(sign(black_box(&message)));
        }
        println!(
            "{name:>14}: {:.2} µs per signature",
            start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
        );
    };
    for round in 1..=3 {
        println!("round {round}");
        time("ed25519-dalek", &|m| {
            use ed25519_dalek::Signer;
            dalek.sign(m).to_bytes().to_vec()
        });
        time("aws-lc-rs", &|m| aws.sign(m).as_ref().to_vec());
        time("ring", &|m| ring.sign(m).as_ref().to_vec());
    }
}
