//! License keys and renewal codes (docs/rules.md §2, keys and codes).
//!
//! Both are drawn from [`ALPHABET`], 31 characters without look-alikes (no
//! `0/O`, `1/I/L`), and end in two check characters.
//!
//! * A **license key** is `PRODUCT[-PRO|-NFR]-XXXXX-XXXXX-XXXXX-XXXXX-XXXCC`:
//!   the product code, the kind marker, 23 random characters (113 bits) and
//!   two check characters `CC`.
//! * A **renewal code** is `RC-XXXXXX-XXXXXX-XXXXXX-XXXXCC`: the marker `RC`,
//!   22 random characters (109 bits) and two check characters.
//!
//! Normalised (upper case, dashes and spaces removed) a renewal code is always
//! 26 characters and a license key always 27 to 36, so the two can never be
//! mistaken for each other, whatever the product code.
//!
//! **Why two check characters.** The check must cover the product code, whose
//! characters range over all 36 of `A–Z0–9`. A single check character drawn
//! from 31 symbols cannot tell 36 values of one position apart (pigeonhole), so
//! some single-character typos would go unnoticed. We therefore compute the
//! checksum as a vector in `Z₃₁²`: every character `c` with index `v` in
//! `0–9A–Z` contributes `wᵢ·(v mod 31, v div 31)` with a position weight
//! `wᵢ ∈ 1..=30`. Because 31 is prime and the embedding is injective, *every*
//! single-character substitution changes the sum, and so does every swap of
//! two adjacent, different characters.

use rand::Rng;
use std::fmt;

use super::kinds::LicenseKind;
use super::product::ProductCode;

/// Symbols of the random part and the check characters: digits 2–9 and the
/// letters without I, L and O (look-alikes of 1 and 0).
pub const ALPHABET: &[u8; 31] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
const BASE: u32 = 31;
/// Random characters in a license key.
pub const KEY_RANDOM_LEN: usize = 23;
/// Random characters in a renewal code.
pub const CODE_RANDOM_LEN: usize = 22;
const CHECK_LEN: usize = 2;
const KEY_BODY_LEN: usize = KEY_RANDOM_LEN + CHECK_LEN;
const CODE_MARKER: &str = "RC";
const CODE_LEN: usize = CODE_MARKER.len() + CODE_RANDOM_LEN + CHECK_LEN;
/// The longest input accepted before normalisation (with generous room for
/// separators); anything longer is malformed without further work.
pub const MAX_INPUT_LEN: usize = 128;

/// Why a value is not a well-formed key or code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not a license key (wrong shape, characters or check characters).
    MalformedKey,
    /// A well-formed renewal code where a license key was expected (R8).
    IsRenewalCode,
    /// Not a renewal code.
    MalformedCode,
}

/// A well-formed license key, stored in its normalised form (no dashes).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LicenseKey {
    normalized: String,
    product_len: usize,
    kind: LicenseKind,
}

/// A well-formed renewal code. Its `Debug` never prints the code.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RenewalCode {
    normalized: String,
}

fn index36(c: u8) -> Option<u32> {
    match c {
        b'0'..=b'9' => Some(u32::from(c - b'0')),
        b'A'..=b'Z' => Some(u32::from(c - b'A') + 10),
        _ => None,
    }
}

fn alphabet_index(c: u8) -> Option<u32> {
    ALPHABET.iter().position(|&a| a == c).map(|i| i as u32)
}

/// The two check characters of `payload` (upper-case `A–Z0–9` only).
fn check_chars(payload: &[u8]) -> [u8; 2] {
    let (mut lo, mut hi) = (0u32, 0u32);
    for (i, &c) in payload.iter().enumerate() {
        let v = index36(c).expect("payload is A-Z0-9");
        let w = (i as u32 % (BASE - 1)) + 1;
        lo = (lo + w * (v % BASE)) % BASE;
        hi = (hi + w * (v / BASE)) % BASE;
    }
    // Mix `lo` into the second character so that a typo in the check
    // characters themselves is caught too (the mapping stays a bijection).
    [ALPHABET[lo as usize], ALPHABET[((hi + lo) % BASE) as usize]]
}

/// Upper-cases and strips dashes and white space. `None` if the input is too
/// long or holds anything but ASCII letters, digits, dashes and spaces.
fn normalize(input: &str) -> Option<String> {
    if input.len() > MAX_INPUT_LEN {
        return None;
    }
    let mut out = String::with_capacity(input.len());
    for c in input.chars() {
        match c {
            '-' | ' ' | '\t' => {}
            c if c.is_ascii_alphanumeric() => out.push(c.to_ascii_uppercase()),
            _ => return None,
        }
    }
    Some(out)
}

/// Draws `n` symbols of [`ALPHABET`] uniformly, by rejection sampling of
/// bytes (248 = 8·31 keeps every symbol equally likely).
fn random_symbols(n: usize, mut next_bytes: impl FnMut(&mut [u8])) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        next_bytes(&mut buf);
        for &b in &buf {
            if out.len() == n {
                break;
            }
            if b < 248 {
                out.push(ALPHABET[usize::from(b % 31)] as char);
            }
        }
    }
    out
}

fn group(s: &str, size: usize) -> impl Iterator<Item = &str> {
    s.as_bytes()
        .chunks(size)
        .map(|c| std::str::from_utf8(c).expect("ASCII"))
}

fn kind_marker(kind: LicenseKind) -> &'static str {
    match kind {
        LicenseKind::Standard => "",
        LicenseKind::Promo => "PRO",
        LicenseKind::Nfr => "NFR",
    }
}

/// A key of `kind` must contain its own marker once and no other marker, so
/// that support can tell the kind at a glance (R9).
fn markers_fit(normalized: &str, kind: LicenseKind) -> bool {
    let pro = normalized.matches("PRO").count();
    let nfr = normalized.matches("NFR").count();
    match kind {
        LicenseKind::Standard => pro == 0 && nfr == 0,
        LicenseKind::Promo => pro == 1 && nfr == 0,
        LicenseKind::Nfr => pro == 0 && nfr == 1,
    }
}

impl LicenseKey {
    /// A new random key for `product` and `kind`, from the thread-local
    /// CSPRNG (ChaCha seeded by the operating system).
    pub fn generate(product: &ProductCode, kind: LicenseKind) -> Self {
        let mut rng = rand::rng();
        Self::generate_with(product, kind, |buf| rng.fill_bytes(buf))
    }

    /// Like [`generate`](Self::generate) with a caller-supplied byte source
    /// (tests use a seeded one).
    pub fn generate_with(
        product: &ProductCode,
        kind: LicenseKind,
        mut next_bytes: impl FnMut(&mut [u8]),
    ) -> Self {
        loop {
            let mut s = String::with_capacity(36);
            s.push_str(product.as_str());
            s.push_str(kind_marker(kind));
            s.push_str(&random_symbols(KEY_RANDOM_LEN, &mut next_bytes));
            let check = check_chars(s.as_bytes());
            s.push(check[0] as char);
            s.push(check[1] as char);
            // A random part that happens to spell a marker (e.g. "NFR") is
            // drawn again: the key must show its kind unambiguously.
            if markers_fit(&s, kind) {
                return LicenseKey {
                    product_len: product.as_str().len(),
                    normalized: s,
                    kind,
                };
            }
        }
    }

    /// Parses user input (any case, dashes/spaces optional) without touching
    /// the database: shape, alphabet and check characters.
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let s = normalize(input).ok_or(ParseError::MalformedKey)?;
        if s.len() == CODE_LEN && RenewalCode::parse(&s).is_ok() {
            return Err(ParseError::IsRenewalCode);
        }
        if s.len() < 2 + KEY_BODY_LEN || s.len() > 8 + 3 + KEY_BODY_LEN {
            return Err(ParseError::MalformedKey);
        }
        let (prefix, body) = s.split_at(s.len() - KEY_BODY_LEN);
        if !body.bytes().all(|c| alphabet_index(c).is_some()) {
            return Err(ParseError::MalformedKey);
        }
        let (product, kind) = if let Some(p) = prefix.strip_suffix("PRO") {
            (p, LicenseKind::Promo)
        } else if let Some(p) = prefix.strip_suffix("NFR") {
            (p, LicenseKind::Nfr)
        } else {
            (prefix, LicenseKind::Standard)
        };
        ProductCode::parse(product).map_err(|_| ParseError::MalformedKey)?;
        let payload = &s.as_bytes()[..s.len() - CHECK_LEN];
        if check_chars(payload) != s.as_bytes()[s.len() - CHECK_LEN..] {
            return Err(ParseError::MalformedKey);
        }
        if !markers_fit(&s, kind) {
            return Err(ParseError::MalformedKey);
        }
        Ok(LicenseKey {
            product_len: product.len(),
            normalized: s,
            kind,
        })
    }

    /// The key without dashes, as stored.
    pub fn normalized(&self) -> &str {
        &self.normalized
    }

    /// The product code the key starts with.
    pub fn product(&self) -> ProductCode {
        ProductCode::parse(&self.normalized[..self.product_len]).expect("checked at parse")
    }

    /// The kind shown by the key's marker.
    pub fn kind(&self) -> LicenseKind {
        self.kind
    }

    /// A shortened form for logs: the product, marker and first group only.
    pub fn redacted(&self) -> String {
        let head = self.normalized.len() - KEY_BODY_LEN;
        format!(
            "{}-{}…",
            &self.normalized[..head],
            &self.normalized[head..head + 5]
        )
    }
}

impl fmt::Display for LicenseKey {
    /// `PRODUCT[-MARKER]-XXXXX-XXXXX-XXXXX-XXXXX-XXXXX`, in one write (every
    /// certificate's `sub` is this).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.normalized.as_bytes();
        let body_start = s.len() - KEY_BODY_LEN;
        // At most 8 + 3 + 25 characters and 6 dashes (see `parse`).
        let mut out = [0u8; 48];
        let mut n = 0;
        let mut put = |part: &[u8], dash: bool| {
            if dash {
                out[n] = b'-';
                n += 1;
            }
            out[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        };
        put(&s[..self.product_len], false);
        if body_start > self.product_len {
            put(&s[self.product_len..body_start], true);
        }
        for g in s[body_start..].chunks(5) {
            put(g, true);
        }
        f.write_str(std::str::from_utf8(&out[..n]).expect("ASCII"))
    }
}

impl fmt::Debug for LicenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LicenseKey({})", self.redacted())
    }
}

impl RenewalCode {
    /// A new random renewal code from the thread-local CSPRNG.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        Self::generate_with(|buf| rng.fill_bytes(buf))
    }

    /// A renewal code from a caller-supplied byte source: a seeded one in
    /// tests, or a keyed hash when the code is derived from a secret.
    pub fn generate_with(next_bytes: impl FnMut(&mut [u8])) -> Self {
        let mut s = String::with_capacity(CODE_LEN);
        s.push_str(CODE_MARKER);
        s.push_str(&random_symbols(CODE_RANDOM_LEN, next_bytes));
        let check = check_chars(s.as_bytes());
        s.push(check[0] as char);
        s.push(check[1] as char);
        RenewalCode { normalized: s }
    }

    /// Parses user input (any case, dashes/spaces optional).
    pub fn parse(input: &str) -> Result<Self, ParseError> {
        let s = normalize(input).ok_or(ParseError::MalformedCode)?;
        if s.len() != CODE_LEN || !s.starts_with(CODE_MARKER) {
            return Err(ParseError::MalformedCode);
        }
        if !s.as_bytes()[CODE_MARKER.len()..]
            .iter()
            .all(|&c| alphabet_index(c).is_some())
        {
            return Err(ParseError::MalformedCode);
        }
        let payload = &s.as_bytes()[..CODE_LEN - CHECK_LEN];
        if check_chars(payload) != s.as_bytes()[CODE_LEN - CHECK_LEN..] {
            return Err(ParseError::MalformedCode);
        }
        Ok(RenewalCode { normalized: s })
    }

    /// The code without dashes. Secret: never log it.
    pub fn expose_normalized(&self) -> &str {
        &self.normalized
    }

    /// The code in its display form, `RC-XXXXXX-XXXXXX-XXXXXX-XXXXXX`. Secret.
    pub fn expose_display(&self) -> String {
        let mut out = String::from(CODE_MARKER);
        for g in group(&self.normalized[CODE_MARKER.len()..], 6) {
            out.push('-');
            out.push_str(g);
        }
        out
    }
}

impl fmt::Debug for RenewalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RenewalCode(<redacted>)")
    }
}

/// `text` with every license key shortened and every renewal code replaced,
/// for messages that may quote them (e.g. a database error) before they are
/// logged.
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= CODE_LEN {
            if RenewalCode::parse(run).is_ok() {
                out.push_str("<renewal code>");
            } else if let Ok(k) = LicenseKey::parse(run) {
                out.push_str(&k.redacted());
            } else {
                out.push_str(run);
            }
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn redaction_hides_keys_and_codes_in_free_text() {
        let p = ProductCode::parse("ACME").unwrap();
        let key = LicenseKey::generate(&p, LicenseKind::Standard);
        let code = RenewalCode::generate();
        let text = format!(
            "duplicate key (license_key)=({}) near '{}' and {}",
            key.normalized(),
            code.expose_display(),
            key
        );
        let red = redact_secrets(&text);
        assert!(!red.contains(key.normalized()), "{red}");
        assert!(!red.contains(&key.to_string()), "{red}");
        assert!(!red.contains(code.expose_normalized()), "{red}");
        assert!(!red.contains(&code.expose_display()[3..]), "{red}");
        assert!(red.contains(&key.redacted()));
        assert!(red.contains("<renewal code>"));
        assert!(red.starts_with("duplicate key (license_key)=("));
    }
    use rand::{SeedableRng, rngs::StdRng};

    fn seeded(seed: u64) -> impl FnMut(&mut [u8]) {
        let mut rng = StdRng::seed_from_u64(seed);
        move |buf: &mut [u8]| rng.fill_bytes(buf)
    }

    fn product_code() -> impl Strategy<Value = ProductCode> {
        "[A-Z0-9]{2,8}".prop_filter_map("no markers", |s| ProductCode::parse(&s).ok())
    }

    fn kind() -> impl Strategy<Value = LicenseKind> {
        prop_oneof![
            Just(LicenseKind::Standard),
            Just(LicenseKind::Promo),
            Just(LicenseKind::Nfr)
        ]
    }

    /// Every character a user could type into a key.
    const TYPEABLE: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

    #[test]
    fn key_display_has_readable_groups() {
        let p = ProductCode::parse("ACME").unwrap();
        let k = LicenseKey::generate_with(&p, LicenseKind::Promo, seeded(1));
        let shown = k.to_string();
        let groups: Vec<&str> = shown.split('-').collect();
        assert_eq!(groups[0], "ACME");
        assert_eq!(groups[1], "PRO");
        assert_eq!(groups.len(), 7);
        assert!(groups[2..].iter().all(|g| g.len() == 5));
    }

    #[test]
    fn code_display_has_readable_groups() {
        let c = RenewalCode::generate_with(seeded(2));
        let shown = c.expose_display();
        let groups: Vec<&str> = shown.split('-').collect();
        assert_eq!(groups[0], "RC");
        assert_eq!(groups.len(), 5);
        assert!(groups[1..].iter().all(|g| g.len() == 6));
    }

    #[test]
    fn alphabet_has_no_look_alikes_and_31_distinct_symbols() {
        for c in b"01ILO" {
            assert!(!ALPHABET.contains(c), "{}", *c as char);
        }
        let mut v = ALPHABET.to_vec();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 31);
    }

    #[test]
    fn random_parts_carry_at_least_100_bits() {
        let bits = |n: usize| n as f64 * 31f64.log2();
        assert!(bits(KEY_RANDOM_LEN) >= 100.0);
        assert!(bits(CODE_RANDOM_LEN) >= 100.0);
    }

    #[test]
    fn r8_a_renewal_code_is_recognised_where_a_key_is_expected() {
        let c = RenewalCode::generate();
        assert_eq!(
            LicenseKey::parse(&c.expose_display()),
            Err(ParseError::IsRenewalCode)
        );
        assert_eq!(
            LicenseKey::parse(&c.expose_normalized().to_lowercase()),
            Err(ParseError::IsRenewalCode)
        );
    }

    #[test]
    fn keys_with_foreign_characters_or_huge_input_are_malformed() {
        assert_eq!(LicenseKey::parse(""), Err(ParseError::MalformedKey));
        assert_eq!(LicenseKey::parse("ACME-ü"), Err(ParseError::MalformedKey));
        assert_eq!(
            LicenseKey::parse(&"A".repeat(10_000)),
            Err(ParseError::MalformedKey)
        );
        assert_eq!(
            RenewalCode::parse("RC'; DROP TABLE x;--"),
            Err(ParseError::MalformedCode)
        );
    }

    #[test]
    fn debug_never_shows_the_code() {
        let c = RenewalCode::generate();
        assert!(!format!("{c:?}").contains(&c.expose_normalized()[2..8]));
    }

    proptest! {
        #[test]
        fn key_round_trips_through_display_case_and_dashes(p in product_code(), k in kind(), seed in any::<u64>()) {
            let key = LicenseKey::generate_with(&p, k, seeded(seed));
            let shown = key.to_string();
            prop_assert_eq!(LicenseKey::parse(&shown).unwrap(), key.clone());
            prop_assert_eq!(LicenseKey::parse(&shown.to_lowercase()).unwrap(), key.clone());
            prop_assert_eq!(LicenseKey::parse(&shown.replace('-', " ")).unwrap(), key.clone());
            prop_assert_eq!(LicenseKey::parse(key.normalized()).unwrap().kind(), k);
            prop_assert_eq!(key.product(), p);
        }

        #[test]
        fn code_round_trips(seed in any::<u64>()) {
            let code = RenewalCode::generate_with(seeded(seed));
            prop_assert_eq!(RenewalCode::parse(&code.expose_display()).unwrap(), code.clone());
            prop_assert_eq!(RenewalCode::parse(&code.expose_display().to_lowercase()).unwrap(), code.clone());
            prop_assert_eq!(RenewalCode::parse(code.expose_normalized()).unwrap(), code);
        }

        #[test]
        fn any_single_character_typo_in_a_key_is_detected(
            p in product_code(), k in kind(), seed in any::<u64>(),
            pos in any::<prop::sample::Index>(), sym in any::<prop::sample::Index>(),
        ) {
            let key = LicenseKey::generate_with(&p, k, seeded(seed));
            let mut bytes = key.normalized().as_bytes().to_vec();
            let i = pos.index(bytes.len());
            let replacement = TYPEABLE[sym.index(TYPEABLE.len())];
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            let typo = String::from_utf8(bytes).unwrap();
            prop_assert!(LicenseKey::parse(&typo).is_err(), "typo {} accepted", typo);
        }

        #[test]
        fn any_single_character_typo_in_a_code_is_detected(
            seed in any::<u64>(), pos in any::<prop::sample::Index>(), sym in any::<prop::sample::Index>(),
        ) {
            let code = RenewalCode::generate_with(seeded(seed));
            let mut bytes = code.expose_normalized().as_bytes().to_vec();
            let i = pos.index(bytes.len());
            let replacement = TYPEABLE[sym.index(TYPEABLE.len())];
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            let typo = String::from_utf8(bytes).unwrap();
            prop_assert!(RenewalCode::parse(&typo).is_err());
            prop_assert!(LicenseKey::parse(&typo).is_err());
        }

        #[test]
        fn r9_no_standard_key_contains_pro_or_nfr(p in product_code(), seed in any::<u64>()) {
            let key = LicenseKey::generate_with(&p, LicenseKind::Standard, seeded(seed));
            prop_assert!(!key.normalized().contains("PRO"));
            prop_assert!(!key.normalized().contains("NFR"));
            prop_assert!(!key.to_string().contains("PRO"));
            prop_assert!(!key.to_string().contains("NFR"));
        }

        #[test]
        fn r9_promo_and_nfr_keys_show_their_marker(p in product_code(), seed in any::<u64>()) {
            let promo = LicenseKey::generate_with(&p, LicenseKind::Promo, seeded(seed));
            prop_assert!(promo.to_string().contains("PRO"));
            let nfr = LicenseKey::generate_with(&p, LicenseKind::Nfr, seeded(seed));
            prop_assert!(nfr.to_string().contains("NFR"));
        }

        #[test]
        fn keys_and_codes_are_never_confused(p in product_code(), k in kind(), seed in any::<u64>()) {
            let key = LicenseKey::generate_with(&p, k, seeded(seed));
            prop_assert_eq!(RenewalCode::parse(&key.to_string()), Err(ParseError::MalformedCode));
            let code = RenewalCode::generate_with(seeded(seed));
            prop_assert_eq!(LicenseKey::parse(&code.expose_display()), Err(ParseError::IsRenewalCode));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = LicenseKey::parse(&s);
            let _ = RenewalCode::parse(&s);
        }
    }
}
