//! The keys that sign offline license certificates, and the signing.
//!
//! A certificate is a compact JWS (RFC 7515): `base64url(header) "."
//! base64url(claims) "." base64url(signature)`, header
//! `{"alg":"EdDSA","typ":"JWT","kid":…}`, signed with Ed25519 (RFC 8037) by
//! `ed25519-dalek`. The claims are decided in
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

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::domain::certificate::{CertificateClaims, CertificateFacts, certificate_claims};
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

/// A certificate handed out within this long to the same workstation,
/// for a license whose facts have not changed since, is handed out again
/// rather than signed anew (its `exp` is at most this much earlier than a
/// new one's would be).
pub const REUSE_FOR: Duration = Duration::from_secs(600);

/// Certificates remembered for reuse at most (then forgotten, all at once).
const REUSE_MAX: usize = 200_000;

/// A certificate handed out, for reuse.
struct Issued {
    /// What it was decided from (license facts, signer).
    facts: u64,
    iat: i64,
    exp: i64,
    jws: Arc<str>,
}

/// The signer and the published key set.
struct Keys {
    signer: Option<(String, SigningKey, String)>,
    jwks: String,
}

/// The keys a server signs and publishes with (see the module doc).
pub struct KeyRing {
    issuer: String,
    /// From `--signing-key-file`: never re-read from the database.
    from_file: bool,
    keys: RwLock<Keys>,
    /// Recent certificates by (license key, fingerprint), in shards.
    issued: Vec<std::sync::Mutex<std::collections::HashMap<(String, String), Issued>>>,
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
                    signer: Some((kid.clone(), key, header(&kid))),
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
                        signer = Some((k.kid.clone(), key, header(&k.kid)));
                    }
                    _ => {
                        tracing::error!(kid = %k.kid, "the active signing key does not decode to its public key; no certificates are signed")
                    }
                }
            }
        }
        let keys = Keys {
            signer,
            jwks: jwks(&published),
        };
        *self.write() = keys;
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

    /// The id of the key that signs now.
    pub fn signing_kid(&self) -> Option<String> {
        self.read().signer.as_ref().map(|(kid, _, _)| kid.clone())
    }

    /// The certificate for `facts` at `now` (see
    /// [`crate::domain::certificate`]), or `None` when the workstation gets
    /// none or no key can sign. One handed out to the same workstation less
    /// than [`REUSE_FOR`] ago, from the same facts and key, is reused.
    pub fn certificate(
        &self,
        facts: &CertificateFacts<'_>,
        now: DateTime<Utc>,
    ) -> Option<Arc<str>> {
        let jti = format!("{:032x}", rand::random::<u128>());
        let claims = certificate_claims(facts, &self.issuer, jti, now)?;
        let kid = self.signing_kid()?;
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (
                &kid,
                facts.standing.status.as_str(),
                facts.standing.expires_at,
                claims.kind.as_str(),
                claims.edition.as_str(),
                claims.seats,
                claims.latest_version.as_str(),
                facts.offline_lease_days,
            )
                .hash(&mut h);
            h.finish()
        };
        let slot = (
            facts.key.normalized().to_string(),
            facts.fingerprint.to_string(),
        );
        let shard = {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(&slot) as usize
                % SHARDS
        };
        let reuse = REUSE_FOR.as_secs() as i64;
        {
            let issued = self.issued[shard].lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = issued.get(&slot)
                && i.facts == digest
                && claims.iat >= i.iat
                && claims.iat - i.iat < reuse
                && i.exp > claims.iat
            {
                return Some(i.jws.clone());
            }
        }
        let jws: Arc<str> = self.sign(&claims)?.into();
        let mut issued = self.issued[shard].lock().unwrap_or_else(|e| e.into_inner());
        if issued.len() >= REUSE_MAX / SHARDS {
            issued.clear();
        }
        issued.insert(
            slot,
            Issued {
                facts: digest,
                iat: claims.iat,
                exp: claims.exp,
                jws: jws.clone(),
            },
        );
        Some(jws)
    }

    /// `claims` signed as a compact JWS, or `None` if no key can sign.
    pub fn sign(&self, claims: &CertificateClaims) -> Option<String> {
        let payload = serde_json::to_vec(claims).expect("claims serialize");
        let keys = self.read();
        let (_, key, header) = keys.signer.as_ref()?;
        let mut jws = String::with_capacity(header.len() + payload.len() * 4 / 3 + 100);
        jws.push_str(header);
        jws.push('.');
        B64.encode_string(&payload, &mut jws);
        let signature = key.sign(jws.as_bytes());
        jws.push('.');
        B64.encode_string(signature.to_bytes(), &mut jws);
        Some(jws)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thumbprint_is_rfc_7638s() {
        // RFC 8037, appendix A.3: the thumbprint of the example key.
        let x = B64
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        assert_eq!(
            thumbprint(&x.try_into().unwrap()),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn a_stored_key_round_trips_and_its_private_part_is_never_printed() {
        let k = new_key(Utc::now());
        let back = SigningKey::from_pkcs8_der(&k.private_der).unwrap();
        assert_eq!(back.verifying_key().to_bytes().to_vec(), k.public_key);
        let shown = format!("{k:?}");
        assert!(shown.contains(&k.kid));
        assert!(!shown.contains("private"), "{shown}");
    }
}
