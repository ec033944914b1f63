//! Hostile input (docs/api.md, Errors): many thousands of generated
//! requests of every request type of the three services — empty, huge (up to
//! ~40 KB, and some just over the 64 KiB message limit), unicode, control
//! characters, NUL bytes, SQL-ish text, near-valid keys and codes, invalid enum
//! numbers, timestamps far out of range, negative/huge page sizes, 0/huge
//! seats and terms — against one running server seeded with a product, a
//! license with an activation and a renewal code.
//!
//! Asserted for every answer: never INTERNAL, never UNKNOWN (nor any other
//! code a caller's mistake must not produce), every refusal carries a
//! `licensing.v1` ErrorInfo, and a mutation is never answered OK. After every
//! request type the server still answers and the database content (every row
//! of every table, read through a separate read-only connection) is byte for
//! byte what it was before the first hostile request.
//!
//! The generators can never build a request that would legitimately change
//! state: whenever a mutation refers to the seeded license, renewal code or
//! product (decided by an independent, deliberately over-eager normalisation:
//! every ASCII letter/digit kept, upper-cased, everything else dropped), a
//! "breaker" makes another field unmistakably invalid (an empty or control-
//! character fingerprint, a NUL in a reason, seats 0, an unknown field-mask
//! path, ...). CreateProduct codes are either the seeded one (already exists)
//! or malformed.
//!
//! Sizes: `HOSTILE_CASES` (default 400) cases per request type, 18 types.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::time::Instant;

use common::{TestServer, code_req, license_req};
use licensd::domain::{LicenseKey, LicenseKind, ProductCode, RenewalCode};
use licensd::grpc::auth::LimitConfig;
use licensd::proto as pb;
use licensd::proto::activation_service_client::ActivationServiceClient;
use licensd::proto::license_service_client::LicenseServiceClient;
use licensd::proto::product_service_client::ProductServiceClient;
use licensd::server::Config;
use proptest::prelude::*;
use proptest::strategy::BoxedStrategy;
use proptest::test_runner::{Config as ProptestConfig, TestCaseResult, TestError, TestRunner};
use prost_types::{FieldMask, Timestamp};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The seeded product's code.
const PRODUCT: &str = "HX7Q";
/// The seeded activation's fingerprint.
const FINGERPRINT: &str = "seed-fp-1";
/// Default number of generated requests per request type.
const DEFAULT_CASES: u32 = 400;

/// The Product fields (field-mask paths that might one day be accepted).
const PRODUCT_FIELDS: &[&str] = &[
    "code",
    "display_name",
    "latest_version",
    "personal_terms_years",
    "business_terms_years",
    "grace_period_months",
    "renewal_basis",
];

// ---------------------------------------------------------------------------
// The seeded state and the "does this refer to it?" guard
// ---------------------------------------------------------------------------

/// What the database holds before the hostile requests.
#[derive(Clone, Debug)]
struct Seed {
    /// The license key as issued (dashed form).
    key: String,
    /// The renewal code as issued (dashed form).
    code: String,
    /// The request id of the seeded license's IssueLicense.
    license_request_id: String,
    /// The request id of the seeded code's IssueRenewalCode.
    code_request_id: String,
}

/// Every ASCII letter and digit, upper-cased; everything else dropped. If the
/// server's own normalisation maps a value to the seeded key/code/product,
/// so does this one (it keeps a superset of what the server would accept).
fn squash(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn refers_to(value: &str, secret: &str) -> bool {
    squash(value) == squash(secret)
}

// ---------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------

fn sel<T: Clone + Debug + 'static>(v: Vec<T>) -> BoxedStrategy<T> {
    prop::sample::select(v).boxed()
}

/// Hand-picked nasty strings.
const NASTY: &[&str] = &[
    "'; DROP TABLE licenses; --",
    "' OR '1'='1",
    "\" OR \"\"=\"",
    "1; DELETE FROM products; --",
    "' UNION SELECT secret_hash, name FROM api_tokens --",
    "'); UPDATE licenses SET seats = 999999; --",
    "%",
    "%%",
    "_",
    "\\",
    "\\'",
    "''",
    "NULL",
    "null",
    "undefined",
    "NaN",
    "-1",
    "0",
    "1e309",
    "99999999999999999999999999",
    "-9223372036854775809",
    "../../../../etc/passwd",
    "%s%s%s%n",
    "{}",
    "{0}",
    "${jndi:ldap://x/a}",
    "<script>alert(1)</script>",
    "\u{0}",
    "a\u{0}b",
    "\u{0}\u{0}\u{0}",
    "\u{7}",
    "\u{1b}[2J",
    "\r\n",
    "\n",
    "\t",
    " ",
    "   ",
    "\u{7f}",
    "\u{85}",
    "\u{a0}",
    "\u{200b}",
    "\u{202e}evil",
    "\u{feff}",
    "\u{fffd}",
    "\u{10ffff}",
    "e\u{301}",
    "ＡＣＭＥ",
    "İ",
    "ß",
    "🔑🔒",
    "Ω≈ç√",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "RC-",
    "RC",
    "PRO",
    "NFR",
    "HX7Q",
    "hx7q",
    "HX7Q-PRO",
    "HX7Q-NFR-",
    "l1.",
    "e1.",
    "p1.",
    "l1.0.0",
    "e1.0",
    "p1.HX7Q",
];

/// A string repeated until it has about `bytes` bytes.
fn of_bytes(c: char, bytes: usize) -> String {
    c.to_string().repeat((bytes / c.len_utf8()).max(1))
}

/// Huge strings that still fit the 64 KiB message limit on their own.
fn huge_text() -> BoxedStrategy<String> {
    (
        1_000usize..40_000,
        sel(vec!['A', 'é', '€', '🔑', '\0', ' ', '\u{7}', '\'']),
    )
        .prop_map(|(bytes, c)| of_bytes(c, bytes))
        .boxed()
}

/// Strings that alone make the message larger than 64 KiB.
fn over_limit_text() -> BoxedStrategy<String> {
    (65_600usize..72_000).prop_map(|n| of_bytes('Z', n)).boxed()
}

/// Lengths around every bound the service might have.
fn boundary_text() -> BoxedStrategy<String> {
    (
        sel(vec![
            1usize, 2, 8, 9, 26, 27, 36, 37, 127, 128, 129, 255, 256, 257, 999, 1000, 1001, 4096,
        ]),
        sel(vec!['a', 'Z', '2', 'é', '🔑', ' ', '-']),
    )
        .prop_map(|(n, c)| c.to_string().repeat(n))
        .boxed()
}

/// Any hostile free text.
fn hostile_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => Just(String::new()),
        8 => sel(NASTY.to_vec()).prop_map(String::from),
        6 => any::<String>(),
        3 => "[ -~]{0,64}",
        3 => "[\\x00-\\x1f\\x7f]{1,4}[ -~]{0,16}",
        2 => "[a-zA-Z0-9]{0,10}\\x00[a-zA-Z0-9]{0,10}",
        2 => (sel(NASTY.to_vec()), any::<String>()).prop_map(|(a, b)| format!("{b}{a}{b}")),
        3 => boundary_text(),
        3 => huge_text(),
        1 => over_limit_text(),
    ]
    .boxed()
}

fn enum_number() -> BoxedStrategy<i32> {
    prop_oneof![
        3 => sel(vec![0, 1, 2, 3, 4, 7, 8, 100, -1, -2, i32::MIN, i32::MAX]),
        1 => any::<i32>(),
    ]
    .boxed()
}

fn hostile_u32() -> BoxedStrategy<u32> {
    prop_oneof![
        3 => sel(vec![0u32, 1, 2, 3, 4, 5, 100, 100_000, 100_001, 1 << 31, u32::MAX - 1, u32::MAX]),
        1 => any::<u32>(),
    ]
    .boxed()
}

fn page_size() -> BoxedStrategy<i32> {
    prop_oneof![
        3 => sel(vec![0, -1, -2, 1, 2, 500, 501, 1000, 1001, i32::MIN, i32::MAX]),
        1 => any::<i32>(),
    ]
    .boxed()
}

fn page_token() -> BoxedStrategy<String> {
    prop_oneof![
        3 => hostile_text(),
        1 => (any::<i64>(), any::<i64>()).prop_map(|(a, b)| format!("l1.{a}.{b}")),
        1 => any::<i64>().prop_map(|a| format!("e1.{a}")),
        1 => hostile_text().prop_map(|a| format!("p1.{a}")),
        1 => sel(vec![
            "l1.", "l1..", "l1.1", "l1.-1.-1", "l1.99999999999999999999.1", "l1.1.99999999999999999999",
            "e1.", "e1.-9223372036854775808", "e1.9223372036854775807", "e1.99999999999999999999",
            "p1.", "p1.HX7Q", "p1.hx7q", "p1.'; DROP TABLE products; --", "L1.0.0", "x1.0",
        ])
        .prop_map(String::from),
    ]
    .boxed()
}

fn timestamp() -> BoxedStrategy<Option<Timestamp>> {
    let seconds = prop_oneof![
        3 => sel(vec![
            0i64, -1, 1, i64::MIN, i64::MAX, 1_000_000_000_000_000, -1_000_000_000_000_000,
            946_684_799, 946_684_800, 7_258_118_399, 7_258_118_400, 253_402_300_799,
            253_402_300_800, -62_135_596_800, -62_135_596_801,
        ]),
        1 => any::<i64>(),
        1 => -1_000_000_000_000_000i64..1_000_000_000_000_000,
        2 => 946_684_800i64..7_258_118_400,
    ];
    let nanos = prop_oneof![
        3 => sel(vec![0i32, -1, 1, 999_999_999, 1_000_000_000, i32::MIN, i32::MAX]),
        1 => any::<i32>(),
        1 => 0i32..1_000_000_000,
    ];
    prop_oneof![
        1 => Just(None),
        4 => (seconds, nanos).prop_map(|(seconds, nanos)| Some(Timestamp { seconds, nanos })),
    ]
    .boxed()
}

/// A timestamp no reading of the API can accept: outside what
/// google.protobuf.Timestamp allows (years 1–9999, nanos 0..1e9).
fn invalid_timestamp() -> BoxedStrategy<Timestamp> {
    prop_oneof![
        (
            sel(vec![
                1_000_000_000_000_000i64,
                -1_000_000_000_000_000,
                i64::MIN,
                i64::MAX
            ]),
            any::<i32>()
        )
            .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
        (
            946_684_800i64..7_258_118_400,
            prop_oneof![i32::MIN..0, 1_000_000_000i32..=i32::MAX]
        )
            .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
    ]
    .boxed()
}

fn version() -> BoxedStrategy<String> {
    prop_oneof![
        2 => sel(vec![
            "", "1.0.0", "2.0.0", "0.0.0", "99.99.99", "1", "1.2", "1.2.3.4.5.6.7.8.9",
            "18446744073709551616.0.0", "4294967296.0.0", "-1.0.0", "1.0.0-beta", "v1.0.0",
            "1..0", ".1", "1.", "01.002.0003", "１.０", "1.0.0 ", " 1.0.0", "1.0.0\u{0}",
            "99999999999999999999999999999999999999.1",
        ])
        .prop_map(String::from),
        1 => "[0-9]{1,3}(\\.[0-9]{1,3}){0,5}",
        1 => (1usize..2000).prop_map(|n| vec!["1"; n].join(".")),
        2 => hostile_text(),
    ]
    .boxed()
}

fn terms() -> BoxedStrategy<Vec<u32>> {
    prop_oneof![
        3 => Just(Vec::new()),
        4 => prop::collection::vec(hostile_u32(), 0..8),
        1 => (1_000usize..10_000).prop_map(|n| vec![1; n]),
    ]
    .boxed()
}

/// A tiny deterministic byte source for the key/code generators.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = (self.0 >> 24) as u8;
        }
    }
}

/// Well-formed license keys that no license has.
fn unknown_key() -> BoxedStrategy<String> {
    (
        sel(vec![PRODUCT, "ZZ", "AB12CDEF", "Q9"]),
        0u8..3,
        any::<u64>(),
    )
        .prop_map(|(product, kind, seed)| {
            let kind = match kind {
                0 => LicenseKind::Standard,
                1 => LicenseKind::Promo,
                _ => LicenseKind::Nfr,
            };
            let mut rng = XorShift(seed | 1);
            let product = ProductCode::parse(product).expect("valid product code");
            LicenseKey::generate_with(&product, kind, |buf| rng.fill(buf)).to_string()
        })
        .boxed()
}

/// Well-formed renewal codes that were never issued.
fn unknown_code() -> BoxedStrategy<String> {
    any::<u64>()
        .prop_map(|seed| {
            let mut rng = XorShift(seed | 1);
            RenewalCode::generate_with(|buf| rng.fill(buf)).expose_display()
        })
        .boxed()
}

/// Renderings the service accepts as the same value (case, separators).
fn renderings(s: &str) -> BoxedStrategy<String> {
    let mixed: String = s
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_lowercase()
            } else {
                c
            }
        })
        .collect();
    sel(vec![
        s.to_string(),
        s.to_lowercase(),
        mixed,
        s.replace('-', ""),
        s.replace('-', " "),
        s.replace('-', "--"),
        s.replace('-', "-\t-"),
        format!(" {s} "),
        format!("-{s}-"),
    ])
}

/// Characters a typo might introduce (including the look-alikes the
/// alphabet leaves out).
const TYPO_CHARS: &[char] = &[
    '2', '3', '7', '9', 'A', 'B', 'H', 'K', 'X', 'Z', '0', 'O', '1', 'I', 'L', 'a', 'z', '-', ' ',
    '\0', 'é', 'А', 'Ｑ',
];

/// Near misses of `s`: one character changed, dropped, inserted, two swapped,
/// truncated, extended, a look-alike, lower-cased typo, ...
fn mangled(s: &str) -> BoxedStrategy<String> {
    let chars: Vec<char> = s.chars().collect();
    let n = chars.len();
    assert!(n >= 2);
    let (c1, c2, c3, c4, c5, c6, c7) = (
        chars.clone(),
        chars.clone(),
        chars.clone(),
        chars.clone(),
        chars.clone(),
        chars.clone(),
        chars.clone(),
    );
    let s1 = s.to_string();
    let s2 = s.to_string();
    prop_oneof![
        4 => (0..n, sel(TYPO_CHARS.to_vec())).prop_map(move |(i, c)| {
            let mut v = c1.clone();
            v[i] = c;
            v.into_iter().collect::<String>()
        }),
        2 => (0..n, sel(TYPO_CHARS.to_vec())).prop_map(move |(i, c)| {
            let mut v = c2.clone();
            v[i] = c;
            v.into_iter().collect::<String>().to_lowercase()
        }),
        2 => (0..n).prop_map(move |i| {
            let mut v = c3.clone();
            v.remove(i);
            v.into_iter().collect::<String>()
        }),
        2 => (0..=n, any::<char>()).prop_map(move |(i, c)| {
            let mut v = c4.clone();
            v.insert(i, c);
            v.into_iter().collect::<String>()
        }),
        2 => (0..n - 1).prop_map(move |i| {
            let mut v = c5.clone();
            v.swap(i, i + 1);
            v.into_iter().collect::<String>()
        }),
        1 => (0..n).prop_map(move |i| c6[..i].iter().collect::<String>()),
        1 => (0..n).prop_map(move |i| {
            let mut v = c7.clone();
            v[i] = match v[i] {
                'A' => 'А', // Cyrillic
                'E' => 'Е',
                'K' => 'К',
                c if c.is_ascii_alphanumeric() => {
                    char::from_u32(c as u32 - 0x21 + 0xFF01).unwrap_or('？') // full width
                }
                c => c,
            };
            v.into_iter().collect::<String>()
        }),
        1 => any::<char>().prop_map(move |c| format!("{s1}{c}")),
        1 => sel(vec![
            format!("{s2}\u{0}"),
            format!("{s2}{s2}"),
            format!("{s2}-"),
            format!("{s2}\n"),
            s2.replace('-', "_"),
            s2.replace('-', "\u{2013}"),
            format!("ZZ{}", s2.split_once('-').map(|x| x.1).unwrap_or(&s2)),
            s2.replacen('-', "-PRO-", 1),
            s2.replacen('-', "-NFR-", 1),
        ]),
    ]
    .boxed()
}

/// Anything in a license-key field: the real key (in any rendering), near
/// misses, unknown well-formed keys, renewal codes, and hostile text.
fn key_any(seed: &Seed) -> BoxedStrategy<String> {
    prop_oneof![
        3 => renderings(&seed.key),
        4 => mangled(&seed.key),
        2 => mangled(&seed.key.to_lowercase()),
        3 => unknown_key(),
        1 => renderings(&seed.code),
        1 => mangled(&seed.code),
        1 => unknown_code(),
        4 => hostile_text(),
    ]
    .boxed()
}

/// Anything in a renewal-code field.
fn code_any(seed: &Seed) -> BoxedStrategy<String> {
    prop_oneof![
        3 => renderings(&seed.code),
        4 => mangled(&seed.code),
        3 => unknown_code(),
        1 => renderings(&seed.key),
        1 => unknown_key(),
        1 => "RC-[A-Z0-9]{0,30}",
        4 => hostile_text(),
    ]
    .boxed()
}

/// Anything in a product-code field (including the seeded product).
fn product_any() -> BoxedStrategy<String> {
    prop_oneof![
        2 => renderings(PRODUCT),
        2 => mangled(PRODUCT),
        2 => "[A-Z][A-Z0-9]{1,7}",
        1 => "[a-z0-9]{0,12}",
        1 => sel(vec!["A", "ABCDEFGHI", "PROX", "XNFR", "AB-C", "AB C", "ÄB", "ZZ", "ZZZZZZZZ"])
            .prop_map(String::from),
        3 => hostile_text(),
    ]
    .boxed()
}

fn fingerprint_any() -> BoxedStrategy<String> {
    prop_oneof![
        2 => Just(FINGERPRINT.to_string()),
        2 => "fp-[a-z0-9]{1,20}",
        1 => invalid_fingerprint(),
        4 => hostile_text(),
    ]
    .boxed()
}

fn request_id_any(seed: &Seed) -> BoxedStrategy<String> {
    prop_oneof![
        2 => "[A-Za-z0-9_.:-]{1,40}",
        1 => sel(vec![seed.license_request_id.clone(), seed.code_request_id.clone()]),
        3 => hostile_text(),
    ]
    .boxed()
}

// Values no reading of the API can accept (the breakers' material).

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Empty, blank, with a control character, or far too long.
fn invalid_fingerprint() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        sel(vec![" ", "   ", "\t", " \t "]).prop_map(String::from),
        "[a-z0-9]{0,5}[\\x00-\\x08\\x0b-\\x1f\\x7f][a-z0-9]{0,5}",
        (257usize..3_000).prop_map(|n| "f".repeat(n)),
        (257usize..1_000).prop_map(|n| "é".repeat(n)),
    ]
    .prop_map(|s| {
        assert!(s.trim().is_empty() || has_control(&s) || s.chars().count() > 256);
        s
    })
    .boxed()
}

/// With a control character, or far too long.
fn invalid_text(min_len: usize) -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9 ]{0,10}[\\x00-\\x08\\x0b-\\x1f\\x7f][a-z0-9 ]{0,10}",
        (min_len..min_len + 3_000).prop_map(|n| "r".repeat(n)),
    ]
    .prop_map(move |s| {
        assert!(has_control(&s) || s.chars().count() >= min_len);
        s
    })
    .boxed()
}

/// A non-empty request id that is not 1–128 printable characters.
fn invalid_request_id() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9]{0,5}[\\x00-\\x08\\x0b-\\x1f\\x7f][a-z0-9]{0,5}",
        (129usize..2_000).prop_map(|n| "q".repeat(n)),
    ]
    .boxed()
}

/// Field-mask paths that name no Product field.
fn invalid_path() -> BoxedStrategy<String> {
    prop_oneof![
        sel(vec![
            "no_such_field",
            "product.no_such_field",
            "'; DROP TABLE products; --",
            "display_name\u{0}",
            "a.b.c",
            "product.product.display_name",
        ])
        .prop_map(String::from),
        "[a-z_]{1,20}",
        hostile_text(),
    ]
    .prop_filter("must name no Product field", |p| {
        let name = p.trim();
        let name = name.strip_prefix("product.").unwrap_or(name).trim();
        !name.is_empty()
            && name != "*"
            && !PRODUCT_FIELDS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(name) || squash(f) == squash(name))
    })
    .boxed()
}

// ---------------------------------------------------------------------------
// Request strategies, one per request type
//
// Every request type is generated in two moods, half the cases each: fully
// hostile (every field drawn mostly from the hostile pools) and mostly valid
// (each field valid with probability 12/13), so that requests also get past
// parsing into the store (unknown keys, unknown products, reused request
// ids, ...) with one odd field. `v` is the weight of a valid value against 1
// for a hostile one.
// ---------------------------------------------------------------------------

/// Valid-or-hostile: `v` to 1.
fn mix<T: Clone + Debug + 'static>(
    v: u32,
    valid: BoxedStrategy<T>,
    hostile: BoxedStrategy<T>,
) -> BoxedStrategy<T> {
    prop_oneof![v => valid, 1 => hostile].boxed()
}

/// Both moods of a request type.
fn moods<T: Clone + Debug + 'static>(build: impl Fn(u32) -> BoxedStrategy<T>) -> BoxedStrategy<T> {
    prop_oneof![build(1), build(12)].boxed()
}

fn text_f(v: u32) -> BoxedStrategy<String> {
    mix(v, "[A-Za-z0-9 _.-]{0,30}".boxed(), hostile_text())
}

fn request_id_f(seed: &Seed, v: u32) -> BoxedStrategy<String> {
    mix(v, "[A-Za-z0-9_.:-]{1,40}".boxed(), request_id_any(seed))
}

fn product_f(v: u32) -> BoxedStrategy<String> {
    mix(
        v,
        prop_oneof![3 => "[A-Z][A-Z0-9]{1,7}", 1 => renderings(PRODUCT)].boxed(),
        product_any(),
    )
}

fn enum_f(v: u32, valid: std::ops::RangeInclusive<i32>) -> BoxedStrategy<i32> {
    mix(v, valid.boxed(), enum_number())
}

fn small_u32_f(v: u32, valid: std::ops::RangeInclusive<u32>) -> BoxedStrategy<u32> {
    mix(v, valid.boxed(), hostile_u32())
}

/// A plausible instant: 2001 to 2023.
fn valid_timestamp() -> BoxedStrategy<Timestamp> {
    (978_307_200i64..1_700_000_000, 0i32..1_000_000_000)
        .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos })
        .boxed()
}

fn timestamp_f(v: u32) -> BoxedStrategy<Option<Timestamp>> {
    mix(v, prop::option::of(valid_timestamp()).boxed(), timestamp())
}

fn version_f(v: u32) -> BoxedStrategy<String> {
    mix(v, "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}".boxed(), version())
}

fn fingerprint_f(v: u32) -> BoxedStrategy<String> {
    mix(
        v,
        prop_oneof![Just(FINGERPRINT.to_string()), "fp-[a-z0-9]{1,20}"].boxed(),
        fingerprint_any(),
    )
}

fn key_f(seed: &Seed, v: u32) -> BoxedStrategy<String> {
    mix(
        v,
        prop_oneof![2 => unknown_key(), 1 => renderings(&seed.key)].boxed(),
        key_any(seed),
    )
}

fn code_f(seed: &Seed, v: u32) -> BoxedStrategy<String> {
    mix(
        v,
        prop_oneof![2 => unknown_code(), 1 => renderings(&seed.code)].boxed(),
        code_any(seed),
    )
}

fn page_size_f(v: u32) -> BoxedStrategy<i32> {
    mix(v, (0i32..=100).boxed(), page_size())
}

fn page_token_f(v: u32) -> BoxedStrategy<String> {
    mix(v, Just(String::new()).boxed(), page_token())
}

fn terms_f(v: u32) -> BoxedStrategy<Vec<u32>> {
    mix(
        v,
        sel(vec![vec![], vec![1], vec![1, 2], vec![1, 2, 3], vec![2]]),
        terms(),
    )
}

fn product_msg(code: BoxedStrategy<String>, v: u32) -> BoxedStrategy<pb::Product> {
    (
        code,
        text_f(v),
        version_f(v),
        terms_f(v),
        terms_f(v),
        mix(
            v,
            prop::option::of(0u32..=12).boxed(),
            prop::option::of(hostile_u32()).boxed(),
        ),
        enum_f(v, 0..=2),
        mix(
            v,
            prop::option::of(0u32..=60).boxed(),
            prop::option::of(hostile_u32()).boxed(),
        ),
    )
        .prop_map(
            |(
                code,
                display_name,
                latest_version,
                personal_terms_years,
                business_terms_years,
                grace_period_months,
                renewal_basis,
                offline_lease_days,
            )| pb::Product {
                code,
                display_name,
                latest_version,
                personal_terms_years,
                business_terms_years,
                grace_period_months,
                renewal_basis,
                offline_lease_days,
            },
        )
        .boxed()
}

/// A code of the right shape for a new product.
fn is_new_product_code(code: &str) -> bool {
    let s = squash(code);
    (2..=8).contains(&s.len()) && !s.contains("PRO") && !s.contains("NFR") && s != PRODUCT
}

fn create_product() -> BoxedStrategy<pb::CreateProductRequest> {
    moods(|v| {
        prop_oneof![
            1 => Just(pb::CreateProductRequest { product: None }),
            12 => product_msg(product_f(v), v).prop_map(|mut p| {
                // Never a new, valid code: that would legitimately create a
                // product. The seeded code stays (PRODUCT_ALREADY_EXISTS);
                // anything that could be read as a fresh code gets a marker
                // no product code may contain.
                if is_new_product_code(&p.code) {
                    p.code.push_str("NFR");
                }
                pb::CreateProductRequest { product: Some(p) }
            }),
        ]
        .boxed()
    })
}

fn update_product() -> BoxedStrategy<pb::UpdateProductRequest> {
    moods(|v| {
        let path = prop_oneof![
            3 * v => sel(PRODUCT_FIELDS[1..].to_vec()).prop_map(String::from),
            1 => sel(PRODUCT_FIELDS.to_vec()).prop_map(|f| format!("product.{f}")),
            1 => sel(vec!["*", "", "product", "DISPLAY_NAME", "displayName", "display_name.x"])
                .prop_map(String::from),
            2 => hostile_text(),
            1 => huge_text(),
        ];
        let mask = prop_oneof![
            1 => Just(None),
            3 => prop::collection::vec(path, 0..6).prop_map(|paths| Some(FieldMask { paths })),
        ];
        let breaker = prop_oneof![
            (invalid_path(), any::<prop::sample::Index>())
                .prop_map(Ok::<(String, prop::sample::Index), i32>),
            sel(vec![3, 4, 7, -1, i32::MIN, i32::MAX])
                .prop_map(Err::<(String, prop::sample::Index), i32>),
        ];
        (
            prop::option::weighted(0.95, product_msg(product_f(v), v)),
            mask,
            breaker,
        )
            .prop_map(|(mut product, mut update_mask, breaker)| {
                // On the seeded product, always one unmistakably bad part.
                if let Some(p) = product.as_mut().filter(|p| refers_to(&p.code, PRODUCT)) {
                    match breaker {
                        Ok((path, at)) => {
                            let paths =
                                &mut update_mask.get_or_insert_with(FieldMask::default).paths;
                            let i = at.index(paths.len() + 1);
                            paths.insert(i, path);
                        }
                        Err(basis) => p.renewal_basis = basis,
                    }
                }
                pb::UpdateProductRequest {
                    product,
                    update_mask,
                }
            })
            .boxed()
    })
}

fn get_product() -> BoxedStrategy<pb::GetProductRequest> {
    moods(|v| {
        product_f(v)
            .prop_map(|code| pb::GetProductRequest { code })
            .boxed()
    })
}

fn list_products() -> BoxedStrategy<pb::ListProductsRequest> {
    moods(|v| {
        (page_size_f(v), page_token_f(v))
            .prop_map(|(page_size, page_token)| pb::ListProductsRequest {
                page_size,
                page_token,
            })
            .boxed()
    })
}

/// Makes an issue request unmistakably invalid (or a refused reuse of an
/// idempotency key: same id, different payload).
#[derive(Clone, Debug)]
enum IssueBreak {
    Seats0,
    Edition(i32),
    Term(u32),
    EmptyRequestId,
    RequestId(String),
    ReuseRequestId,
    OrderRef(String),
    CustomerRef(String),
    Reseller(String),
    StartsAt(Timestamp),
    Kind(i32),
}

fn issue_break() -> BoxedStrategy<IssueBreak> {
    prop_oneof![
        Just(IssueBreak::Seats0),
        sel(vec![0, 3, 4, 7, -1, i32::MIN, i32::MAX]).prop_map(IssueBreak::Edition),
        sel(vec![0u32, 4, 5, 10, 100, u32::MAX]).prop_map(IssueBreak::Term),
        Just(IssueBreak::EmptyRequestId),
        invalid_request_id().prop_map(IssueBreak::RequestId),
        Just(IssueBreak::ReuseRequestId),
        invalid_text(10_001).prop_map(IssueBreak::OrderRef),
        invalid_text(10_001).prop_map(IssueBreak::CustomerRef),
        invalid_text(10_001).prop_map(IssueBreak::Reseller),
        invalid_timestamp().prop_map(IssueBreak::StartsAt),
        sel(vec![4, 7, -1, i32::MIN, i32::MAX]).prop_map(IssueBreak::Kind),
    ]
    .boxed()
}

fn issue_license(seed: &Seed) -> BoxedStrategy<pb::IssueLicenseRequest> {
    let seed = seed.clone();
    moods(move |v| {
        let fields = (
            request_id_f(&seed, v),
            product_f(v),
            enum_f(v, 1..=2),
            enum_f(v, 0..=3),
            small_u32_f(v, 1..=10),
            small_u32_f(v, 1..=3),
            timestamp_f(v),
            text_f(v),
            text_f(v),
            text_f(v),
        );
        let reused = seed.license_request_id.clone();
        (fields, issue_break())
            .prop_map(
                move |(
                    (
                        request_id,
                        product,
                        edition,
                        kind,
                        seats,
                        term_years,
                        starts_at,
                        order_ref,
                        customer_ref,
                        reseller,
                    ),
                    breaker,
                )| {
                    let mut r = pb::IssueLicenseRequest {
                        request_id,
                        product,
                        edition,
                        kind,
                        seats,
                        term_years,
                        starts_at,
                        order_ref,
                        customer_ref,
                        reseller,
                    };
                    // Only the seeded product exists: a request for it always
                    // gets a broken field. Others are unknown or malformed.
                    if refers_to(&r.product, PRODUCT) {
                        match breaker {
                            IssueBreak::Seats0 => r.seats = 0,
                            IssueBreak::Edition(e) => r.edition = e,
                            IssueBreak::Term(t) => r.term_years = t,
                            IssueBreak::EmptyRequestId => r.request_id.clear(),
                            IssueBreak::RequestId(s) => r.request_id = s,
                            IssueBreak::ReuseRequestId => {
                                // The seeded license has 3 seats.
                                r.request_id = reused.clone();
                                if r.seats == 3 {
                                    r.seats = 2;
                                }
                            }
                            IssueBreak::OrderRef(s) => r.order_ref = s,
                            IssueBreak::CustomerRef(s) => r.customer_ref = s,
                            IssueBreak::Reseller(s) => r.reseller = s,
                            IssueBreak::StartsAt(t) => r.starts_at = Some(t),
                            IssueBreak::Kind(k) => r.kind = k,
                        }
                    }
                    r
                },
            )
            .boxed()
    })
}

fn issue_renewal_code(seed: &Seed) -> BoxedStrategy<pb::IssueRenewalCodeRequest> {
    let seed = seed.clone();
    moods(move |v| {
        let fields = (
            request_id_f(&seed, v),
            product_f(v),
            enum_f(v, 1..=2),
            small_u32_f(v, 1..=10),
            small_u32_f(v, 1..=3),
            text_f(v),
            text_f(v),
        );
        let reused = seed.code_request_id.clone();
        (fields, issue_break())
            .prop_map(
                move |(
                    (request_id, product, edition, seats, term_years, order_ref, reseller),
                    breaker,
                )| {
                    let mut r = pb::IssueRenewalCodeRequest {
                        request_id,
                        product,
                        edition,
                        seats,
                        term_years,
                        order_ref,
                        reseller,
                    };
                    if refers_to(&r.product, PRODUCT) {
                        match breaker {
                            IssueBreak::Seats0 | IssueBreak::StartsAt(_) => r.seats = 0,
                            IssueBreak::Edition(e) | IssueBreak::Kind(e) => {
                                r.edition = if (1..=2).contains(&e) { 0 } else { e }
                            }
                            IssueBreak::Term(t) => r.term_years = t,
                            IssueBreak::EmptyRequestId => r.request_id.clear(),
                            IssueBreak::RequestId(s) => r.request_id = s,
                            IssueBreak::ReuseRequestId => {
                                // The seeded code is for 3 seats.
                                r.request_id = reused.clone();
                                if r.seats == 3 {
                                    r.seats = 2;
                                }
                            }
                            IssueBreak::OrderRef(s) | IssueBreak::CustomerRef(s) => r.order_ref = s,
                            IssueBreak::Reseller(s) => r.reseller = s,
                        }
                    }
                    r
                },
            )
            .boxed()
    })
}

fn get_license(seed: &Seed) -> BoxedStrategy<pb::GetLicenseRequest> {
    let seed = seed.clone();
    moods(move |v| {
        key_f(&seed, v)
            .prop_map(|license_key| pb::GetLicenseRequest { license_key })
            .boxed()
    })
}

fn list_licenses() -> BoxedStrategy<pb::ListLicensesRequest> {
    moods(|v| {
        let optional = |v: u32| {
            mix(
                v,
                sel(vec!["", "", "order-1", "cust-1", "order-2", "nobody"])
                    .prop_map(String::from)
                    .boxed(),
                hostile_text(),
            )
        };
        (
            mix(
                v,
                prop_oneof![
                    Just(String::new()),
                    "[A-Z][A-Z0-9]{1,7}",
                    Just(PRODUCT.to_string())
                ]
                .boxed(),
                product_any(),
            ),
            optional(v),
            optional(v),
            timestamp_f(v),
            timestamp_f(v),
            page_size_f(v),
            page_token_f(v),
        )
            .prop_map(
                |(
                    product,
                    customer_ref,
                    order_ref,
                    expires_after,
                    expires_before,
                    page_size,
                    page_token,
                )| pb::ListLicensesRequest {
                    product,
                    customer_ref,
                    order_ref,
                    expires_after,
                    expires_before,
                    page_size,
                    page_token,
                },
            )
            .boxed()
    })
}

/// (license_key, reason, request_id) of Suspend/Reinstate/Revoke: on the
/// seeded license the reason or the request id is broken.
fn status_change(seed: &Seed) -> BoxedStrategy<(String, String, String)> {
    let seed = seed.clone();
    moods(move |v| {
        let key = seed.key.clone();
        (
            key_f(&seed, v),
            text_f(v),
            prop_oneof![1 => Just(String::new()), 2 => request_id_f(&seed, v)],
            prop_oneof![
                invalid_text(10_001).prop_map(Ok::<String, String>),
                invalid_request_id().prop_map(Err::<String, String>)
            ],
        )
            .prop_map(move |(k, mut reason, mut request_id, breaker)| {
                if refers_to(&k, &key) {
                    match breaker {
                        Ok(r) => reason = r,
                        Err(id) => request_id = id,
                    }
                }
                (k, reason, request_id)
            })
            .boxed()
    })
}

fn list_license_events(seed: &Seed) -> BoxedStrategy<pb::ListLicenseEventsRequest> {
    let seed = seed.clone();
    moods(move |v| {
        (key_f(&seed, v), page_size_f(v), page_token_f(v))
            .prop_map(
                |(license_key, page_size, page_token)| pb::ListLicenseEventsRequest {
                    license_key,
                    page_size,
                    page_token,
                },
            )
            .boxed()
    })
}

fn get_renewal_code(seed: &Seed) -> BoxedStrategy<pb::GetRenewalCodeRequest> {
    let seed = seed.clone();
    moods(move |v| {
        code_f(&seed, v)
            .prop_map(|renewal_code| pb::GetRenewalCodeRequest { renewal_code })
            .boxed()
    })
}

fn void_renewal_code(seed: &Seed) -> BoxedStrategy<pb::VoidRenewalCodeRequest> {
    let seed = seed.clone();
    moods(move |v| {
        let code = seed.code.clone();
        (
            code_f(&seed, v),
            text_f(v),
            prop_oneof![1 => Just(String::new()), 2 => request_id_f(&seed, v)],
            prop_oneof![
                invalid_text(10_001).prop_map(Ok::<String, String>),
                invalid_request_id().prop_map(Err::<String, String>)
            ],
        )
            .prop_map(move |(renewal_code, mut reason, mut request_id, breaker)| {
                if refers_to(&renewal_code, &code) {
                    match breaker {
                        Ok(r) => reason = r,
                        Err(id) => request_id = id,
                    }
                }
                pb::VoidRenewalCodeRequest {
                    renewal_code,
                    reason,
                    request_id,
                }
            })
            .boxed()
    })
}

fn activate(seed: &Seed) -> BoxedStrategy<pb::ActivateRequest> {
    let seed = seed.clone();
    moods(move |v| {
        let key = seed.key.clone();
        (
            key_f(&seed, v),
            fingerprint_f(v),
            mix(v, "[a-z0-9-]{1,20}(\\.[a-z]{2,5})?".boxed(), hostile_text()),
            version_f(v),
            prop_oneof![
                invalid_fingerprint().prop_map(Ok::<String, String>),
                invalid_text(10_001).prop_map(Err::<String, String>)
            ],
        )
            .prop_map(
                move |(license_key, mut fingerprint, mut hostname, client_version, breaker)| {
                    if refers_to(&license_key, &key) {
                        match breaker {
                            Ok(f) => fingerprint = f,
                            Err(h) => hostname = h,
                        }
                    }
                    pb::ActivateRequest {
                        license_key,
                        fingerprint,
                        hostname,
                        client_version,
                    }
                },
            )
            .boxed()
    })
}

fn deactivate(seed: &Seed) -> BoxedStrategy<pb::DeactivateRequest> {
    let seed = seed.clone();
    moods(move |v| {
        let key = seed.key.clone();
        (key_f(&seed, v), fingerprint_f(v), invalid_fingerprint())
            .prop_map(move |(license_key, mut fingerprint, bad)| {
                if refers_to(&license_key, &key) {
                    fingerprint = bad;
                }
                pb::DeactivateRequest {
                    license_key,
                    fingerprint,
                }
            })
            .boxed()
    })
}

fn validate(seed: &Seed) -> BoxedStrategy<pb::ValidateRequest> {
    let seed = seed.clone();
    moods(move |v| {
        (
            key_f(&seed, v),
            prop_oneof![1 => Just(String::new()), 3 => fingerprint_f(v)],
            prop_oneof![1 => Just(String::new()), 3 => version_f(v)],
        )
            .prop_map(
                |(license_key, fingerprint, client_version)| pb::ValidateRequest {
                    license_key,
                    fingerprint,
                    client_version,
                    certificate_expires_at: None,
                },
            )
            .boxed()
    })
}

fn redeem(seed: &Seed) -> BoxedStrategy<pb::RedeemRenewalCodeRequest> {
    let seed = seed.clone();
    moods(move |v| {
        let key = seed.key.clone();
        (
            key_f(&seed, v),
            code_f(&seed, v),
            fingerprint_f(v),
            version_f(v),
            invalid_fingerprint(),
        )
            .prop_map(
                move |(license_key, renewal_code, mut fingerprint, client_version, bad)| {
                    // Against the seeded license even a refusal may write one
                    // history event (docs/rules.md §4), so the fingerprint is
                    // always bad.
                    if refers_to(&license_key, &key) {
                        fingerprint = bad;
                    }
                    pb::RedeemRenewalCodeRequest {
                        license_key,
                        renewal_code,
                        fingerprint,
                        client_version,
                    }
                },
            )
            .boxed()
    })
}

// ---------------------------------------------------------------------------
// The harness: one server, one runtime, a tally
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Clients {
    products: ProductServiceClient<common::Authed>,
    licenses: LicenseServiceClient<common::Authed>,
    activation: ActivationServiceClient<Channel>,
}

struct Harness {
    rt: tokio::runtime::Runtime,
    clients: Clients,
    seed: Seed,
    db_path: std::path::PathBuf,
    baseline: RefCell<String>,
    /// rpc → status code name → count.
    tally: RefCell<BTreeMap<&'static str, BTreeMap<String, usize>>>,
    /// "rpc: what is wrong" → how often, and the smallest example.
    violations: RefCell<BTreeMap<String, (usize, String)>>,
}

fn clip(s: String) -> String {
    const MAX: usize = 3_000;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

/// Why an answer breaks docs/api.md (Errors), if it does: (what, details).
fn judge(mutation: bool, res: &Result<(), Status>) -> Result<(), (String, String)> {
    match res {
        Ok(()) if mutation => Err((
            "a hostile mutation was answered OK (it must be refused, nothing written)".into(),
            String::new(),
        )),
        Ok(()) => Ok(()),
        Err(st) => match st.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists => {
                // Every refusal carries a licensing.v1 ErrorInfo (docs/api.md, Errors).
                match st.get_error_details().error_info() {
                    Some(info) if info.domain == "licensing.v1" && !info.reason.is_empty() => {
                        Ok(())
                    }
                    _ => Err((
                        format!("refusal {:?} without a licensing.v1 ErrorInfo", st.code()),
                        st.message().to_string(),
                    )),
                }
            }
            // The transport's 64 KiB request limit (tonic's own answer).
            Code::OutOfRange if st.message().contains("too large") => Ok(()),
            // Abuse limits: with their ErrorInfo and RetryInfo. (The client's
            // own h2 layer also reports oversized answer headers this way.)
            Code::ResourceExhausted
                if st
                    .get_error_details()
                    .error_info()
                    .is_some_and(|i| i.domain == "licensing.v1") =>
            {
                Ok(())
            }
            // The client's own HTTP/2 layer refused the answer: seen when an
            // error answer's headers (grpc-message, grpc-status-details-bin)
            // outgrow what a standard client accepts (16 KiB by default).
            code if st.message().contains("h2 protocol error") => Err((
                format!(
                    "the answer could not be read by a standard tonic client \
                     (h2 protocol error, reported as {code:?} = {}): its headers are \
                     probably too large, e.g. an error message echoing the input",
                    code as i32
                ),
                st.message().to_string(),
            )),
            code @ (Code::Cancelled | Code::Unavailable) => Err((
                format!(
                    "status {code:?} ({}) — typically collateral damage: an earlier \
                     answer broke the shared HTTP/2 connection",
                    code as i32
                ),
                st.message().to_string(),
            )),
            code => Err((
                format!("status {code:?} ({}) for a caller's mistake", code as i32),
                st.message().to_string(),
            )),
        },
    }
}

impl Harness {
    fn record(&self, rpc: &'static str, res: &Result<(), Status>) {
        let code = match res {
            Ok(()) => "OK".to_string(),
            Err(st) => format!("{:?}", st.code()),
        };
        *self
            .tally
            .borrow_mut()
            .entry(rpc)
            .or_default()
            .entry(code)
            .or_default() += 1;
    }

    /// Sends `cases` generated requests of one type and checks every answer,
    /// then that the server still answers and the database is unchanged.
    fn drive<S, F, Fut>(&self, rpc: &'static str, mutation: bool, cases: u32, strategy: S, call: F)
    where
        S: Strategy,
        S::Value: Clone + Debug,
        F: Fn(Clients, S::Value) -> Fut,
        Fut: Future<Output = Result<(), Status>>,
    {
        let mut runner = TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            max_shrink_iters: 200,
            ..ProptestConfig::default()
        });
        // Violations are collected (with the smallest example of each kind)
        // rather than failing at the first one, so that one run reports
        // every kind of problem; the test fails at the end.
        let result = runner.run(&strategy, |req| -> TestCaseResult {
            let shown = req.clone();
            let res = self.rt.block_on(call(self.clients.clone(), req));
            self.record(rpc, &res);
            if let Err((what, detail)) = judge(mutation, &res) {
                self.violation(
                    format!("{rpc}: {what}"),
                    format!("{detail}\n      request: {shown:?}"),
                );
            }
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(why, minimal)) => panic!(
                "{rpc}: {why}\n  minimal failing request: {}",
                clip(format!("{minimal:?}"))
            ),
            Err(TestError::Abort(why)) => panic!("{rpc}: generation aborted: {why}"),
        }
        self.assert_alive(rpc);
        self.assert_db_unchanged(rpc);
    }

    /// The server still answers a normal Validate and a normal GetLicense
    /// (a few tries: an earlier answer may have broken the client's HTTP/2
    /// connection, which tonic re-establishes on the next call). A server
    /// that no longer answers ends the test at once.
    fn assert_alive(&self, after: &str) {
        let key = self.seed.key.clone();
        let answers = self.rt.block_on(async {
            let mut last = None;
            for _ in 0..3 {
                let mut c = self.clients.clone();
                let v = c
                    .activation
                    .validate(pb::ValidateRequest {
                        license_key: key.clone(),
                        fingerprint: FINGERPRINT.into(),
                        client_version: "2.0.0".into(),
                        certificate_expires_at: None,
                    })
                    .await;
                let l = c
                    .licenses
                    .get_license(pb::GetLicenseRequest {
                        license_key: key.clone(),
                    })
                    .await;
                match (v, l) {
                    (Ok(v), Ok(_)) => return Ok(v.into_inner()),
                    (v, l) => last = Some(format!("{:?} / {:?}", v.err(), l.err())),
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(last.unwrap_or_default())
        });
        match answers {
            Ok(v) if v.validity == pb::Validity::Valid as i32 => {}
            Ok(v) => self.violation(
                format!("{after}: the seeded license is no longer VALID"),
                format!("{v:?}"),
            ),
            Err(e) => {
                panic!("the server no longer answers after the hostile {after} requests: {e}")
            }
        }
    }

    fn violation(&self, what: String, example: String) {
        let mut v = self.violations.borrow_mut();
        let entry = v.entry(what).or_insert((0, String::new()));
        entry.0 += 1;
        if entry.1.is_empty() || example.len() < entry.1.len() {
            entry.1 = example;
        }
    }

    /// Records a violation if the database differs from the baseline (then
    /// the new content becomes the baseline, so that later request types
    /// are judged on their own).
    fn assert_db_unchanged(&self, after: &str) {
        let now = self.rt.block_on(dump_db(&self.db_path));
        let mut baseline = self.baseline.borrow_mut();
        if now != *baseline {
            let before: Vec<&str> = baseline.lines().collect();
            let after_lines: Vec<&str> = now.lines().collect();
            let removed: Vec<&&str> = before.iter().filter(|l| !after_lines.contains(l)).collect();
            let added: Vec<&&str> = after_lines.iter().filter(|l| !before.contains(l)).collect();
            self.violation(
                format!("{after}: the database changed"),
                format!("rows gone: {removed:#?}\n      rows new: {added:#?}"),
            );
            *baseline = now;
        }
    }
}

/// Every row of every table (and the schema) as one deterministic string,
/// read through a separate read-only connection.
async fn dump_db(path: &Path) -> String {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};
    use std::fmt::Write;

    fn ident(s: &str) -> String {
        format!("\"{}\"", s.replace('"', "\"\""))
    }

    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .expect("open the database read-only");
    let mut out = String::new();
    let schema = sqlx::query(
        "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("read the schema");
    for row in schema {
        let (t, n, tbl, sql): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        writeln!(out, "schema {t} {n} on {tbl}: {sql}").unwrap();
    }
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .expect("list tables");
    for table in tables {
        let columns: Vec<String> = sqlx::query(AssertSqlSafe(format!(
            "PRAGMA table_info({})",
            ident(&table)
        )))
        .fetch_all(&mut conn)
        .await
        .expect("table info")
        .iter()
        .map(|r| r.get::<String, _>("name"))
        .collect();
        let select = columns
            .iter()
            .map(|c| format!("quote({})", ident(c)))
            .collect::<Vec<_>>()
            .join(" || '|' || ");
        let order = columns
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT {select} FROM {} ORDER BY {order}",
            ident(&table)
        )))
        .fetch_all(&mut conn)
        .await
        .expect("read a table");
        writeln!(
            out,
            "table {table} ({}) — {} rows",
            columns.join(", "),
            rows.len()
        )
        .unwrap();
        for r in rows {
            writeln!(out, "  {table}: {r}").unwrap();
        }
    }
    let _ = conn.close().await;
    out
}

fn ok<T>(r: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

#[test]
fn hostile_input_is_refused_and_changes_nothing() {
    let started = Instant::now();
    let cases: u32 = std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // The per-address rate limit would answer most of these thousands of
    // ActivationService calls with RESOURCE_EXHAUSTED before they reach the
    // parsing we want to exercise; it is covered by its own tests.
    let config = Config {
        limits: LimitConfig {
            activation_per_ip_per_sec: 0,
            validate_per_ip_per_sec: 0,
            ..LimitConfig::default()
        },
        ..Config::default()
    };
    let (mut server, seed) = rt.block_on(async {
        let mut s = TestServer::start_with(config).await;
        s.product(PRODUCT, "2.0.0").await;
        let lic_req = license_req(PRODUCT, 3, 1);
        let license = s.issue(lic_req.clone()).await;
        s.activate(&license.key, FINGERPRINT)
            .await
            .expect("seed activation");
        let c_req = code_req(PRODUCT, 3, 1);
        let code = s.code(c_req.clone()).await;
        assert!(!code.renewal_code.is_empty());
        let seed = Seed {
            key: license.key,
            code: code.renewal_code,
            license_request_id: lic_req.request_id,
            code_request_id: c_req.request_id,
        };
        (s, seed)
    });
    let clients = Clients {
        products: server.products.clone(),
        licenses: server.licenses.clone(),
        activation: server.activation.clone(),
    };
    let baseline = rt.block_on(dump_db(&server.db_path));
    for table in [
        "products",
        "licenses",
        "activations",
        "renewal_codes",
        "license_events",
    ] {
        assert!(
            baseline.contains(&format!("  {table}: ")),
            "seeded {table} missing from the dump:\n{baseline}"
        );
    }
    let original = baseline.clone();
    let h = Harness {
        rt,
        clients,
        seed: seed.clone(),
        db_path: server.db_path.clone(),
        baseline: RefCell::new(baseline),
        tally: RefCell::new(BTreeMap::new()),
        violations: RefCell::new(BTreeMap::new()),
    };
    let s = &seed;

    // ProductService.
    h.drive(
        "CreateProduct",
        true,
        cases,
        create_product(),
        |mut c, r| async move { ok(c.products.create_product(r).await) },
    );
    h.drive(
        "GetProduct",
        false,
        cases,
        get_product(),
        |mut c, r| async move { ok(c.products.get_product(r).await) },
    );
    h.drive(
        "ListProducts",
        false,
        cases,
        list_products(),
        |mut c, r| async move { ok(c.products.list_products(r).await) },
    );
    h.drive(
        "UpdateProduct",
        true,
        cases,
        update_product(),
        |mut c, r| async move { ok(c.products.update_product(r).await) },
    );

    // LicenseService.
    h.drive(
        "IssueLicense",
        true,
        cases,
        issue_license(s),
        |mut c, r| async move { ok(c.licenses.issue_license(r).await) },
    );
    h.drive(
        "GetLicense",
        false,
        cases,
        get_license(s),
        |mut c, r| async move { ok(c.licenses.get_license(r).await) },
    );
    h.drive(
        "ListLicenses",
        false,
        cases,
        list_licenses(),
        |mut c, r| async move { ok(c.licenses.list_licenses(r).await) },
    );
    h.drive(
        "SuspendLicense",
        true,
        cases,
        status_change(s),
        |mut c, (k, reason, id)| async move {
            ok(c.licenses
                .suspend_license(pb::SuspendLicenseRequest {
                    license_key: k,
                    reason,
                    request_id: id,
                })
                .await)
        },
    );
    h.drive(
        "ReinstateLicense",
        true,
        cases,
        status_change(s),
        |mut c, (k, reason, id)| async move {
            ok(c.licenses
                .reinstate_license(pb::ReinstateLicenseRequest {
                    license_key: k,
                    reason,
                    request_id: id,
                })
                .await)
        },
    );
    h.drive(
        "RevokeLicense",
        true,
        cases,
        status_change(s),
        |mut c, (k, reason, id)| async move {
            ok(c.licenses
                .revoke_license(pb::RevokeLicenseRequest {
                    license_key: k,
                    reason,
                    request_id: id,
                })
                .await)
        },
    );
    h.drive(
        "ListLicenseEvents",
        false,
        cases,
        list_license_events(s),
        |mut c, r| async move { ok(c.licenses.list_license_events(r).await) },
    );
    h.drive(
        "IssueRenewalCode",
        true,
        cases,
        issue_renewal_code(s),
        |mut c, r| async move { ok(c.licenses.issue_renewal_code(r).await) },
    );
    h.drive(
        "GetRenewalCode",
        false,
        cases,
        get_renewal_code(s),
        |mut c, r| async move { ok(c.licenses.get_renewal_code(r).await) },
    );
    h.drive(
        "VoidRenewalCode",
        true,
        cases,
        void_renewal_code(s),
        |mut c, r| async move { ok(c.licenses.void_renewal_code(r).await) },
    );

    // ActivationService.
    h.drive(
        "Activate",
        true,
        cases,
        activate(s),
        |mut c, r| async move { ok(c.activation.activate(r).await) },
    );
    h.drive(
        "Deactivate",
        true,
        cases,
        deactivate(s),
        |mut c, r| async move { ok(c.activation.deactivate(r).await) },
    );
    h.drive(
        "Validate",
        false,
        cases,
        validate(s),
        |mut c, r| async move { ok(c.activation.validate(r).await) },
    );
    h.drive(
        "RedeemRenewalCode",
        true,
        cases,
        redeem(s),
        |mut c, r| async move { ok(c.activation.redeem_renewal_code(r).await) },
    );

    // The seeded state answers as before, and the whole database is byte
    // for byte what it was before the first hostile request.
    let (license, code) = h.rt.block_on(async {
        let license = server.license(&seed.key).await;
        let code = server
            .licenses
            .get_renewal_code(pb::GetRenewalCodeRequest {
                renewal_code: seed.code.clone(),
            })
            .await
            .expect("seeded code")
            .into_inner();
        (license, code)
    });
    if license.status != pb::LicenseStatus::Active as i32
        || license.seats_used != 1
        || license.renewal_count != 0
        || code.state != pb::RenewalCodeState::Unredeemed as i32
    {
        h.violation(
            "whole run: the seeded license or code changed".into(),
            format!("{license:?}\n      {code:?}"),
        );
    }
    *h.baseline.borrow_mut() = original;
    h.assert_db_unchanged("whole run (against the dump before the first hostile request)");

    let tally = h.tally.take();
    let total: usize = tally.values().flat_map(|m| m.values()).sum();
    let mut report = format!(
        "hostile input: {total} requests of {} types in {:.1?}\n",
        tally.len(),
        started.elapsed()
    );
    for (rpc, codes) in tally.iter() {
        let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        report.push_str(&format!("  {rpc:<18} {}\n", codes.join(", ")));
    }
    eprintln!("{report}");
    let violations = h.violations.take();
    if !violations.is_empty() {
        let mut text = format!(
            "{} kinds of violations of docs/api.md, Errors (never INTERNAL/UNKNOWN, \
             every refusal with a licensing.v1 ErrorInfo, hostile mutations refused, \
             nothing written):\n",
            violations.len()
        );
        for (what, (n, example)) in &violations {
            text.push_str(&format!(
                "\n* {what} — {n} times; smallest example:\n      {}\n",
                clip(example.clone())
            ));
        }
        panic!("{text}\n{report}");
    }
    assert!(
        total >= 18 * cases as usize,
        "fewer requests than planned: {total}"
    );
    let rt = h.rt;
    rt.block_on(server.stop());
}
