//! The keys that sign offline license certificates, and the signing.
//!
//! A certificate is a compact JWS (RFC 7515): `base64url(header) "."
//! base64url(claims) "." base64url(signature)`, header
//! `{"alg":"EdDSA","typ":"JWT","kid":…}`, signed with Ed25519 (RFC 8037).
//! Keys are made, encoded (PKCS#8) and checked with `ed25519-dalek`; the
//! signing itself is `aws-lc-rs`'s, whose assembly signs in about half
//! dalek's time (10 against 17–20 µs here), and a certificate is signed on
//! every Activate and renewal and on many Validates. Ed25519 is
//! deterministic: both sign the same bytes alike (a test holds them to it).
//! The claims are decided in
//! [`crate::domain::certificate`]. A key's id is its RFC 7638 JWK
//! thumbprint (SHA-256, base64url), so the same key has the same id
//! everywhere.
//!
//! **Where keys live.** In the database (`signing_keys`), shared by every
//! replica: the first server to start creates one; `licensd signing-key
//! rotate` makes a new key the signer and keeps the old one published;
//! `retire KID` stops publishing it. Each replica re-reads the keys every
//! [`REFRESH_EVERY`], so a rotation reaches every replica within that time.
//! Or `--signing-key-file PEM` (PKCS#8), for operators who keep keys in a
//! secret store: that key signs and is the only one published. The private
//! key never leaves this module: not in an answer, a log or the key set.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::domain::certificate::{
    CertificateClaims, CertificateFacts, certificate_claims, certificate_lifetime,
};
use crate::store::{SqlStore, StoreError, StoreResult};

/// How often a replica re-reads the keys from the database.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// A key's place in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Signs new certificates (one at a time), and is published.
    Active,
    /// Published, so certificates it signed keep verifying; signs nothing.
    Published,
    /// Neither.
    Retired,
}

impl KeyState {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Published => "published",
            KeyState::Retired => "retired",
        }
    }

    /// From storage.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyState::Active),
            "published" => Some(KeyState::Published),
            "retired" => Some(KeyState::Retired),
            _ => None,
        }
    }
}

/// A signing key as stored.
#[derive(Clone)]
pub struct StoredKey {
    /// Key id (JWK thumbprint).
    pub kid: String,
    /// PKCS#8 DER of the private key.
    pub private_der: Vec<u8>,
    /// The 32-byte public key.
    pub public_key: Vec<u8>,
    /// State.
    pub state: KeyState,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Retired at.
    pub retired_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// A fresh key, ready to store.
pub fn new_key(now: DateTime<Utc>) -> StoredKey {
    use rand::Rng;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = SigningKey::from_bytes(&secret);
    let public = key.verifying_key().to_bytes();
    StoredKey {
        kid: thumbprint(&public),
        private_der: key
            .to_pkcs8_der()
            .expect("an Ed25519 key encodes as PKCS#8")
            .as_bytes()
            .to_vec(),
        public_key: public.to_vec(),
        state: KeyState::Active,
        created_at: now,
        retired_at: None,
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key: SHA-256 over
/// `{"crv":"Ed25519","kty":"OKP","x":…}`, base64url.
pub fn thumbprint(public: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public)
    );
    B64.encode(Sha256::digest(canonical.as_bytes()))
}

/// Signing costs an Ed25519 signature (about as much as a whole Validate
/// answered from memory), so a workstation that validates often (telemetry)
/// is handed the certificate it got last, while the license's facts and
/// the signing key are unchanged, until it is [`reuse_for`] old: a tenth of
/// the product's lease, at most a day. Its `exp` is then at most that much
/// earlier than a fresh one's.
pub fn reuse_for(offline_lease_days: u32) -> Duration {
    (Duration::from_secs(86_400) * offline_lease_days / 10).min(Duration::from_secs(86_400))
}

/// Certificates remembered for reuse at most, per replica (then forgotten,
/// a shard at a time): about 250 bytes each, since what is remembered is
/// not the certificate but what rebuilds it ([`Issued`]).
const REUSE_MAX: usize = 100_000;

/// A certificate handed out, for reuse: not its ~600 bytes of text but
/// what they are made of. Its claims are a function of the facts it was
/// decided from, its `iat` and its `jti` ([`certificate_claims`]); while
/// the facts and the signer are the same, the claims rebuilt from them are
/// the bytes that were signed, and the stored signature completes the
/// same certificate (a test holds every field to it).
struct Issued {
    /// The license key (normalized) followed by the fingerprint.
    who: Box<str>,
    /// Where the fingerprint starts in `who`.
    key_len: u32,
    standing: crate::domain::Standing,
    edition: crate::domain::Edition,
    seats: u32,
    /// The product's latest version as written (two versions can compare
    /// equal and be written differently: "1.0" and "1.0.0").
    latest_version: Option<Box<str>>,
    offline_lease_days: u32,
    /// The signer's generation.
    signer: u64,
    /// Issued at: with the facts, it gives the certificate's `exp` again.
    iat: i64,
    jti: u128,
    signature: [u8; 64],
}

impl Issued {
    /// Whether this was decided from `facts` (the key `key`, normalized)
    /// and `signer`, exactly: then the claims it rebuilds are the ones
    /// signed. Without building anything: this runs on every Validate that
    /// gets a certificate.
    fn is_for(&self, key: &str, facts: &CertificateFacts<'_>, signer: u64) -> bool {
        let (k, fingerprint) = self.who.split_at(self.key_len as usize);
        k == key
            && fingerprint == facts.fingerprint
            && self.standing == facts.standing
            && self.edition == facts.edition
            && self.seats == facts.seats
            && self.latest_version.as_deref() == facts.latest_version.map(|v| v.as_str())
            && self.offline_lease_days == facts.offline_lease_days
            && self.signer == signer
    }
}

/// A certificate's `jti`: 128 random bits, in hex.
fn jti_text(jti: u128) -> String {
    hex::encode(jti.to_be_bytes())
}

/// What a JWS signs: `header "." base64url(claims)`.
fn signing_input(header: &str, claims: &CertificateClaims) -> String {
    let payload = serde_json::to_vec(claims).expect("claims serialize");
    let mut jws = String::with_capacity(header.len() + payload.len() * 4 / 3 + 90);
    jws.push_str(header);
    jws.push('.');
    B64.encode_string(&payload, &mut jws);
    jws
}

/// The compact JWS: the signing input, "." and the signature.
fn with_signature(mut input: String, signature: &[u8]) -> String {
    input.push('.');
    B64.encode_string(signature, &mut input);
    input
}

/// The key that signs: its id, the key, and the encoded JWS header.
type Signer = (String, Ed25519KeyPair, String);

/// The signing half of `key`, for [`KeyRing::sign`].
fn signing_pair(key: &SigningKey) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_and_public_key(key.as_bytes(), key.verifying_key().as_bytes())
        .expect("a dalek key is a valid Ed25519 seed and public key")
}

/// The signer and the published key set.
struct Keys {
    signer: Option<Signer>,
    jwks: String,
    /// Changes whenever the signer does.
    generation: u64,
}

/// The keys a server signs and publishes with (see the module doc).
pub struct KeyRing {
    issuer: String,
    /// From `--signing-key-file`: never re-read from the database.
    from_file: bool,
    keys: RwLock<Keys>,
    /// Recent certificates by (license key, fingerprint), in shards.
    issued: Vec<std::sync::Mutex<std::collections::HashMap<u64, Issued>>>,
}

const SHARDS: usize = 16;

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file.
    #[error("signing key file {path}: {reason}")]
    File {
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The database.
    #[error("signing keys: {0}")]
    Store(#[from] StoreError),
}

impl KeyRing {
    /// The ring of `store`'s keys, creating the first key if there is none;
    /// or, with `file`, of that one key.
    pub async fn load(
        store: &SqlStore,
        issuer: &str,
        file: Option<&Path>,
    ) -> Result<Arc<KeyRing>, KeyError> {
        let ring = KeyRing {
            issuer: issuer.to_string(),
            from_file: file.is_some(),
            keys: RwLock::new(Keys {
                signer: None,
                jwks: jwks(&[]),
                generation: 0,
            }),
            issued: (0..SHARDS).map(|_| Default::default()).collect(),
        };
        match file {
            Some(path) => {
                let key = read_key_file(path)?;
                let public = key.verifying_key().to_bytes();
                let kid = thumbprint(&public);
                *ring.write() = Keys {
                    jwks: jwks(&[(kid.clone(), public)]),
                    signer: Some((kid.clone(), signing_pair(&key), header(&kid))),
                    generation: 1,
                };
            }
            None => {
                store.ensure_signing_key(&new_key(Utc::now())).await?;
                ring.refresh(store).await?;
            }
        }
        Ok(Arc::new(ring))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Keys> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads the keys from the database (nothing with a key file).
    pub async fn refresh(&self, store: &SqlStore) -> StoreResult<()> {
        if self.from_file {
            return Ok(());
        }
        let stored = store.signing_keys().await?;
        let mut published = Vec::new();
        let mut signer = None;
        for k in &stored {
            if k.state == KeyState::Retired {
                continue;
            }
            let Ok(public) = <[u8; 32]>::try_from(k.public_key.as_slice()) else {
                tracing::error!(kid = %k.kid, "a stored signing key's public key is not 32 bytes; skipped");
                continue;
            };
            published.push((k.kid.clone(), public));
            if k.state == KeyState::Active {
                match SigningKey::from_pkcs8_der(&k.private_der) {
                    Ok(key) if key.verifying_key().to_bytes() == public => {
                        signer = Some((k.kid.clone(), signing_pair(&key), header(&k.kid)));
                    }
                    _ => {
                        tracing::error!(kid = %k.kid, "the active signing key does not decode to its public key; no certificates are signed")
                    }
                }
            }
        }
        let mut keys = self.write();
        let same_signer = match (&keys.signer, &signer) {
            (Some((a, _, _)), Some((b, _, _))) => a == b,
            (None, None) => true,
            _ => false,
        };
        if !same_signer {
            keys.generation += 1;
        }
        keys.signer = signer;
        keys.jwks = jwks(&published);
        Ok(())
    }

    /// Re-reads the keys every [`REFRESH_EVERY`] until aborted.
    pub async fn keep_fresh(self: Arc<Self>, store: SqlStore) {
        if self.from_file {
            return;
        }
        loop {
            tokio::time::sleep(REFRESH_EVERY).await;
            if let Err(e) = self.refresh(&store).await {
                tracing::warn!(error = %e, "signing keys: cannot re-read; signing with the keys read last");
            }
        }
    }

    /// The issuer (`iss`) of the certificates.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The published keys, as a JSON Web Key Set.
    pub fn jwks(&self) -> String {
        self.read().jwks.clone()
    }

    /// The certificate for `facts` at `now` (see
    /// [`crate::domain::certificate`]), or `None` when the workstation gets
    /// none or no key can sign. The one handed to the same workstation last
    /// is handed out again while it is less than [`reuse_for`] old and
    /// nothing it was decided from has changed.
    pub fn certificate(&self, facts: &CertificateFacts<'_>, now: DateTime<Utc>) -> Option<String> {
        let (iat, _) = certificate_lifetime(facts, now)?;
        let keys = self.read();
        let (_, pair, header) = keys.signer.as_ref()?;
        let generation = keys.generation;
        let key = facts.key.normalized();
        let slot = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (key, facts.fingerprint).hash(&mut h);
            h.finish()
        };
        let shard = &self.issued[slot as usize % SHARDS];
        let reuse = reuse_for(facts.offline_lease_days).as_secs() as i64;
        let held = {
            let issued = shard.lock().unwrap_or_else(|e| e.into_inner());
            issued
                .get(&slot)
                .filter(|i| i.is_for(key, facts, generation))
                .filter(|i| (0..reuse).contains(&(iat - i.iat)))
                .map(|i| (i.iat, i.jti, i.signature))
        };
        // The claims as signed (`exp` too: the same facts from the same
        // whole second give the same), reused while it has not passed.
        if let Some((then, jti, signature)) = held
            && let Some(claims) = DateTime::from_timestamp(then, 0)
                .and_then(|then| certificate_claims(facts, &self.issuer, jti_text(jti), then))
            && claims.exp > iat
        {
            return Some(with_signature(signing_input(header, &claims), &signature));
        }
        let jti = rand::random::<u128>();
        let claims = certificate_claims(facts, &self.issuer, jti_text(jti), now)?;
        let input = signing_input(header, &claims);
        let signature: [u8; 64] = pair.sign(input.as_bytes()).as_ref().try_into().ok()?;
        drop(keys);
        let mut issued = shard.lock().unwrap_or_else(|e| e.into_inner());
        if issued.len() >= REUSE_MAX / SHARDS {
            issued.clear();
        }
        issued.insert(
            slot,
            Issued {
                who: format!("{key}{}", facts.fingerprint).into(),
                key_len: key.len() as u32,
                standing: facts.standing,
                edition: facts.edition,
                seats: facts.seats,
                latest_version: facts.latest_version.map(|v| v.as_str().into()),
                offline_lease_days: facts.offline_lease_days,
                signer: generation,
                iat: claims.iat,
                jti,
                signature,
            },
        );
        Some(with_signature(input, &signature))
    }
}

/// The encoded JWS header of key `kid`.
fn header(kid: &str) -> String {
    B64.encode(
        serde_json::to_vec(&json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}))
            .expect("a header serializes"),
    )
}

/// A JSON Web Key Set of `keys` (id, public key).
fn jwks(keys: &[(String, [u8; 32])]) -> String {
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, public)| {
            json!({
                "kty": "OKP",
                "crv": "Ed25519",
                "x": B64.encode(public),
                "kid": kid,
                "use": "sig",
                "alg": "EdDSA",
            })
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

fn read_key_file(path: &Path) -> Result<SigningKey, KeyError> {
    let fail = |reason: String| KeyError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    SigningKey::from_pkcs8_pem(&text)
        .map_err(|e| fail(format!("not a PKCS#8 PEM Ed25519 private key ({e})")))
}

/// What `licensd certificate inspect` finds in a certificate.
#[derive(Debug)]
pub struct Inspection {
    /// The decoded header.
    pub header: serde_json::Value,
    /// The decoded claims.
    pub claims: serde_json::Value,
    /// Whether the signature verifies (`None`: no keys to check with).
    pub signature: Option<Result<String, String>>,
}

/// Decodes `jws` and, given a JWK Set `jwks`, checks its signature: the
/// header must say `EdDSA` and name a key of the set. Never trusts the
/// header beyond choosing among the given keys.
pub fn inspect(jws: &str, jwks: Option<&str>) -> Result<Inspection, String> {
    let parts: Vec<&str> = jws.trim().split('.').collect();
    let [h, p, sig] = parts[..] else {
        return Err(format!(
            "not a compact JWS: {} dot-separated parts, expected 3",
            parts.len()
        ));
    };
    let decode = |what: &str, part: &str| -> Result<serde_json::Value, String> {
        let bytes = B64
            .decode(part)
            .map_err(|e| format!("{what}: not base64url ({e})"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{what}: not JSON ({e})"))
    };
    let header = decode("header", h)?;
    let claims = decode("claims", p)?;
    let signature = jwks.map(|set| -> Result<String, String> {
        let set: serde_json::Value =
            serde_json::from_str(set).map_err(|e| format!("the key set is not JSON ({e})"))?;
        if header["alg"] != "EdDSA" {
            return Err(format!("alg is {}, not EdDSA", header["alg"]));
        }
        let kid = header["kid"].as_str().ok_or("the header names no kid")?;
        let key = set["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|k| k["kid"] == kid && k["kty"] == "OKP" && k["crv"] == "Ed25519")
            .ok_or_else(|| format!("no key {kid} in the key set (retired, or another issuer's)"))?;
        let x = B64
            .decode(key["x"].as_str().unwrap_or_default())
            .ok()
            .and_then(|x| <[u8; 32]>::try_from(x).ok())
            .ok_or("the key's x is not 32 bytes of base64url")?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|e| e.to_string())?;
        let sig = B64
            .decode(sig)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
            .ok_or("the signature is not 64 bytes of base64url")?;
        key.verify_strict(
            format!("{h}.{p}").as_bytes(),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .map_err(|_| "the signature does not match".to_string())?;
        Ok(kid.to_string())
    });
    Ok(Inspection {
        header,
        claims,
        signature,
    })
}

#[cfg(test)]
mod tests;
