//! Why an operation is refused. One variant per refusal reason of docs/api.md
//! (Errors), with the figures that explain it.

use chrono::{DateTime, SecondsFormat, Utc};

use super::kinds::{Edition, LicenseKind};

/// A field that failed validation, named as the caller spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Field path, e.g. `product.code` or `seats`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// The broad class of a refusal; the gRPC layer maps each to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalClass {
    /// The request itself is malformed (nothing was read or written).
    InvalidArgument,
    /// A referenced product, license or code does not exist.
    NotFound,
    /// The thing to create exists, or an idempotency key was reused.
    AlreadyExists,
    /// A business rule (R2–R11) refuses the operation.
    FailedPrecondition,
}

/// A refusal with its reason (docs/api.md, Errors: refusal reasons).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// A field is missing or out of bounds.
    #[error("invalid {}: {}", .0.field, .0.description)]
    InvalidField(FieldViolation),
    /// The license key is malformed.
    #[error("{field} is not a well-formed license key")]
    MalformedKey {
        /// Field that held it.
        field: &'static str,
    },
    /// The renewal code is malformed.
    #[error("{field} is not a well-formed renewal code")]
    MalformedRenewalCode {
        /// Field that held it.
        field: &'static str,
    },
    /// R1: the term is not offered for this product and edition.
    #[error(
        "a {term_years}-year term is not offered for the {edition} edition (allowed: {allowed:?})"
    )]
    TermNotAllowed {
        /// Term asked for.
        term_years: u32,
        /// Edition.
        edition: Edition,
        /// Terms allowed.
        allowed: Vec<u32>,
    },
    /// Unknown product.
    #[error("product {0} does not exist")]
    ProductNotFound(String),
    /// The product code is taken.
    #[error("product {0} already exists")]
    ProductAlreadyExists(String),
    /// Unknown license.
    #[error("no license has this key")]
    LicenseNotFound,
    /// Unknown renewal code.
    #[error("no renewal code matches")]
    RenewalCodeNotFound,
    /// R2: the license has expired.
    #[error("the license expired at {}", ts(.expires_at))]
    LicenseExpired {
        /// Its expiry.
        expires_at: DateTime<Utc>,
    },
    /// R11: suspended.
    #[error("the license is suspended")]
    LicenseSuspended,
    /// R11: revoked.
    #[error("the license is revoked")]
    LicenseRevoked,
    /// R7: every seat is taken.
    #[error("all {seats} seats of the license are in use")]
    SeatLimitReached {
        /// Seats of the license.
        seats: u32,
    },
    /// R8: a renewal code where a license key is expected.
    #[error(
        "{field} holds a renewal code, not a license key: a renewal code cannot activate a product"
    )]
    RenewalCodeIsNotALicenseKey {
        /// Field that held it.
        field: &'static str,
    },
    /// R4: the code was used before.
    #[error("the renewal code was already redeemed")]
    RenewalCodeAlreadyRedeemed {
        /// When.
        redeemed_at: Option<DateTime<Utc>>,
    },
    /// The code was voided.
    #[error("the renewal code is void")]
    RenewalCodeVoid,
    /// R9: PROMO and NFR licenses are never renewed.
    #[error("{kind} licenses cannot be renewed; a new license is needed")]
    LicenseKindNotRenewable {
        /// Kind of the license.
        kind: LicenseKind,
    },
    /// R10: the code is for another product.
    #[error("the renewal code is for product {code_product}, the license for {license_product}")]
    ProductMismatch {
        /// License's product.
        license_product: String,
        /// Code's product.
        code_product: String,
    },
    /// R10: the code is for another edition.
    #[error("the renewal code is for the {code_edition} edition, the license is {license_edition}")]
    EditionMismatch {
        /// License's edition.
        license_edition: Edition,
        /// Code's edition.
        code_edition: Edition,
    },
    /// R7: the code covers another seat count.
    #[error("the renewal code covers {code_seats} seats, the license has {license_seats}")]
    SeatCountMismatch {
        /// License's seats.
        license_seats: u32,
        /// Code's seats.
        code_seats: u32,
    },
    /// R3: past the grace period.
    #[error("the renewal window closed at {}; only a new license can be bought", ts(.renewable_until))]
    RenewalWindowClosed {
        /// End of the window.
        renewable_until: DateTime<Utc>,
    },
    /// R5 (and Deactivate): the fingerprint is not bound to the license.
    #[error("this workstation is not activated on the license")]
    MachineNotActivated,
    /// R6: the client must update first.
    #[error(
        "version {client_version} is older than the latest version {latest_version}; update first"
    )]
    ClientVersionOutdated {
        /// The version reported.
        client_version: String,
        /// The product's latest version.
        latest_version: String,
    },
    /// The request id was used before with another payload.
    #[error("request_id was already used for a different request")]
    IdempotencyKeyReused,
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Refusal {
    /// The UPPER_SNAKE reason (docs/api.md, Errors).
    pub fn reason(&self) -> &'static str {
        use Refusal::*;
        match self {
            InvalidField(_) => "INVALID_FIELD",
            MalformedKey { .. } => "MALFORMED_KEY",
            MalformedRenewalCode { .. } => "MALFORMED_RENEWAL_CODE",
            TermNotAllowed { .. } => "TERM_NOT_ALLOWED",
            ProductNotFound(_) => "PRODUCT_NOT_FOUND",
            ProductAlreadyExists(_) => "PRODUCT_ALREADY_EXISTS",
            LicenseNotFound => "LICENSE_NOT_FOUND",
            RenewalCodeNotFound => "RENEWAL_CODE_NOT_FOUND",
            LicenseExpired { .. } => "LICENSE_EXPIRED",
            LicenseSuspended => "LICENSE_SUSPENDED",
            LicenseRevoked => "LICENSE_REVOKED",
            SeatLimitReached { .. } => "SEAT_LIMIT_REACHED",
            RenewalCodeIsNotALicenseKey { .. } => "RENEWAL_CODE_IS_NOT_A_LICENSE_KEY",
            RenewalCodeAlreadyRedeemed { .. } => "RENEWAL_CODE_ALREADY_REDEEMED",
            RenewalCodeVoid => "RENEWAL_CODE_VOID",
            LicenseKindNotRenewable { .. } => "LICENSE_KIND_NOT_RENEWABLE",
            ProductMismatch { .. } => "PRODUCT_MISMATCH",
            EditionMismatch { .. } => "EDITION_MISMATCH",
            SeatCountMismatch { .. } => "SEAT_COUNT_MISMATCH",
            RenewalWindowClosed { .. } => "RENEWAL_WINDOW_CLOSED",
            MachineNotActivated => "MACHINE_NOT_ACTIVATED",
            ClientVersionOutdated { .. } => "CLIENT_VERSION_OUTDATED",
            IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
        }
    }

    /// Which class of status the refusal is.
    pub fn class(&self) -> RefusalClass {
        use Refusal::*;
        match self {
            InvalidField(_)
            | MalformedKey { .. }
            | MalformedRenewalCode { .. }
            | TermNotAllowed { .. } => RefusalClass::InvalidArgument,
            ProductNotFound(_) | LicenseNotFound | RenewalCodeNotFound => RefusalClass::NotFound,
            ProductAlreadyExists(_) | IdempotencyKeyReused => RefusalClass::AlreadyExists,
            _ => RefusalClass::FailedPrecondition,
        }
    }

    /// The field a field-level refusal is about (for `google.rpc.BadRequest`).
    pub fn field_violation(&self) -> Option<FieldViolation> {
        use Refusal::*;
        match self {
            InvalidField(v) => Some(v.clone()),
            MalformedKey { field } => {
                Some(FieldViolation::new(*field, "not a well-formed license key"))
            }
            MalformedRenewalCode { field } => Some(FieldViolation::new(
                *field,
                "not a well-formed renewal code",
            )),
            TermNotAllowed { .. } => Some(FieldViolation::new("term_years", self.to_string())),
            _ => None,
        }
    }

    /// The figures behind the refusal, as `google.rpc.ErrorInfo` metadata.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        use Refusal::*;
        match self {
            InvalidField(v) => vec![("field", v.field.clone())],
            MalformedKey { field }
            | MalformedRenewalCode { field }
            | RenewalCodeIsNotALicenseKey { field } => {
                vec![("field", (*field).to_string())]
            }
            TermNotAllowed {
                term_years,
                edition,
                allowed,
            } => vec![
                ("term_years", term_years.to_string()),
                ("edition", edition.to_string()),
                (
                    "allowed_terms_years",
                    allowed
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ],
            ProductNotFound(p) | ProductAlreadyExists(p) => vec![("product", p.clone())],
            LicenseExpired { expires_at } => vec![("expires_at", ts(expires_at))],
            SeatLimitReached { seats } => vec![("license_seats", seats.to_string())],
            RenewalCodeAlreadyRedeemed { redeemed_at } => {
                redeemed_at.iter().map(|t| ("redeemed_at", ts(t))).collect()
            }
            LicenseKindNotRenewable { kind } => vec![("license_kind", kind.to_string())],
            ProductMismatch {
                license_product,
                code_product,
            } => vec![
                ("license_product", license_product.clone()),
                ("code_product", code_product.clone()),
            ],
            EditionMismatch {
                license_edition,
                code_edition,
            } => vec![
                ("license_edition", license_edition.to_string()),
                ("code_edition", code_edition.to_string()),
            ],
            SeatCountMismatch {
                license_seats,
                code_seats,
            } => vec![
                ("license_seats", license_seats.to_string()),
                ("code_seats", code_seats.to_string()),
            ],
            RenewalWindowClosed { renewable_until } => {
                vec![("renewable_until", ts(renewable_until))]
            }
            ClientVersionOutdated {
                client_version,
                latest_version,
            } => vec![
                ("client_version", client_version.clone()),
                ("latest_version", latest_version.clone()),
            ],
            LicenseNotFound | RenewalCodeNotFound | LicenseSuspended | LicenseRevoked
            | RenewalCodeVoid | MachineNotActivated | IdempotencyKeyReused => vec![],
        }
    }
}
