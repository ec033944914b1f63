//! Who may call what (docs/api.md, Roles), and bearer tokens.
//!
//! * admin — everything;
//! * billing — LicenseService, and ProductService reads;
//! * support — reads only: Get/List, license history, GetRenewalCode;
//! * ActivationService, health and reflection need no token (for products the
//!   license key is the credential).
//!
//! A token is `lsd_<id>_<secret>`: the id (12 symbols) finds the token's row,
//! the secret (32 symbols, 158 bits) is stored only as its SHA-256 and
//! compared in constant time.

use std::fmt;

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::keys::ALPHABET;

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Licenses and renewal codes; product reads.
    Billing,
    /// Read-only.
    Support,
}

impl Role {
    /// Stable lower-case name (CLI and storage).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Billing => "billing",
            Role::Support => "support",
        }
    }

    /// Inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "billing" => Some(Role::Billing),
            "support" => Some(Role::Support),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (ActivationService, health, reflection).
    Public,
    /// A valid token with one of these roles.
    Roles(&'static [Role]),
}

const EVERYONE: &[Role] = &[Role::Admin, Role::Billing, Role::Support];
const BILLING: &[Role] = &[Role::Admin, Role::Billing];
const ADMIN: &[Role] = &[Role::Admin];

/// The access rule for a gRPC method path such as
/// `/licensing.v1.LicenseService/IssueLicense`. Unknown methods of a
/// protected service need a token too (they answer UNIMPLEMENTED after it).
pub fn required_access(path: &str) -> Access {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Public;
    };
    match service {
        "licensing.v1.ProductService" => match method {
            "GetProduct" | "ListProducts" => Access::Roles(EVERYONE),
            _ => Access::Roles(ADMIN),
        },
        "licensing.v1.LicenseService" => match method {
            "GetLicense" | "ListLicenses" | "ListLicenseEvents" | "GetRenewalCode"
            | "ListEvents" | "WatchEvents" => Access::Roles(EVERYONE),
            _ => Access::Roles(BILLING),
        },
        _ => Access::Public,
    }
}

/// A parsed `lsd_<id>_<secret>` token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    id: String,
    secret: String,
}

const ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
/// Longest `authorization` value looked at.
pub const MAX_TOKEN_LEN: usize = 64;

fn symbols(n: usize) -> String {
    let mut rng = rand::rng();
    let mut out = String::with_capacity(n);
    while out.len() < n {
        let b = (rng.next_u32() & 0xff) as u8;
        if b < 248 {
            out.push(ALPHABET[usize::from(b % 31)] as char);
        }
    }
    out
}

impl Token {
    /// A new random token.
    pub fn generate() -> Self {
        Token {
            id: symbols(ID_LEN),
            secret: symbols(SECRET_LEN),
        }
    }

    /// Parses the token text; `None` if it is not of our shape.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > MAX_TOKEN_LEN {
            return None;
        }
        let rest = s.strip_prefix("lsd_")?;
        let (id, secret) = rest.split_once('_')?;
        let ok = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| ALPHABET.contains(&b));
        (ok(id, ID_LEN) && ok(secret, SECRET_LEN)).then(|| Token {
            id: id.into(),
            secret: secret.into(),
        })
    }

    /// The public id (stored in clear, used to find the row).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SHA-256 of the secret, as stored.
    pub fn secret_hash(&self) -> Vec<u8> {
        Sha256::digest(self.secret.as_bytes()).to_vec()
    }

    /// Whether `stored_hash` is this token's, compared in constant time.
    pub fn matches(&self, stored_hash: &[u8]) -> bool {
        self.secret_hash().ct_eq(stored_hash).into()
    }

    /// The full token text. Secret: shown once, never logged.
    pub fn expose(&self) -> String {
        format!("lsd_{}_{}", self.id, self.secret)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, <redacted>)", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_match_only_their_hash() {
        let t = Token::generate();
        let parsed = Token::parse(&t.expose()).unwrap();
        assert_eq!(parsed, t);
        assert!(parsed.matches(&t.secret_hash()));
        assert!(!parsed.matches(&Token::generate().secret_hash()));
        assert!(!format!("{t:?}").contains(&t.secret));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        for bad in ["", "lsd_", "lsd_abc_def", "Bearer x", &"lsd_".repeat(40)] {
            assert!(Token::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn roles_follow_the_access_table() {
        use Access::*;
        assert_eq!(
            required_access("/licensing.v1.ActivationService/Validate"),
            Public
        );
        assert_eq!(required_access("/grpc.health.v1.Health/Check"), Public);
        assert_eq!(
            required_access("/licensing.v1.ProductService/CreateProduct"),
            Roles(ADMIN)
        );
        assert_eq!(
            required_access("/licensing.v1.ProductService/ListProducts"),
            Roles(EVERYONE)
        );
        assert_eq!(
            required_access("/licensing.v1.LicenseService/IssueLicense"),
            Roles(BILLING)
        );
        assert_eq!(
            required_access("/licensing.v1.LicenseService/VoidRenewalCode"),
            Roles(BILLING)
        );
        assert_eq!(
            required_access("/licensing.v1.LicenseService/GetRenewalCode"),
            Roles(EVERYONE)
        );
        for feed in ["ListEvents", "WatchEvents"] {
            assert_eq!(
                required_access(&format!("/licensing.v1.LicenseService/{feed}")),
                Roles(EVERYONE)
            );
        }
        assert_eq!(
            required_access("/licensing.v1.LicenseService/Unknown"),
            Roles(BILLING)
        );
    }
}
