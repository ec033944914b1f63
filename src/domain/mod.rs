//! The business rules of licensd (docs/rules.md §1–§4), free of I/O.
//!
//! Every function here takes the current instant as a parameter (`now`);
//! nothing in this module reads the clock, the network or the database. The
//! store loads rows, asks these functions for a decision, and writes what they
//! decided, inside one transaction.

pub mod auth;
pub mod certificate;
pub mod error;
pub mod event;
pub mod keys;
pub mod kinds;
pub mod license;
pub mod product;
pub mod rules;
pub mod time;
pub mod version;

pub use error::{FieldViolation, Refusal};
pub use keys::{LicenseKey, ParseError, RenewalCode};
pub use kinds::{CodeState, Edition, LicenseKind, LicenseStatus};
pub use license::{Activation, License, RenewalCodeRecord, Standing, Validity};
pub use product::{Product, ProductCode, RenewalBasis};
pub use version::Version;
