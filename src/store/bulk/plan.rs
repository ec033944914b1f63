//! What gets seeded: the plan, the shape of every license as a pure
//! function of its index, and the column values both backends write.

use chrono::{DateTime, Duration, Utc};

use crate::domain::time::add_years;
use crate::domain::{Edition, LicenseKey, LicenseKind, ProductCode, RenewalCode};
use crate::store::{StoreError, StoreResult, micros};

/// The client version seeded activations report, and the product's latest.
pub const SEED_VERSION: &str = "1.0.0";

/// What to seed. The product must exist already (with latest version
/// [`SEED_VERSION`] and the default terms) and the database must hold no
/// license yet.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    /// The product every license and code is for.
    pub product: ProductCode,
    /// How many licenses.
    pub licenses: usize,
    /// How many unredeemed renewal codes.
    pub codes: usize,
    /// The instant the data is seeded "at": every license is valid then.
    pub now: DateTime<Utc>,
}

/// The shape of one seeded license, from its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LicenseShape {
    /// Its class: licenses and codes of one class fit each other.
    pub class: usize,
    /// Edition.
    pub edition: Edition,
    /// Seats: always at least one more than [`activations`](Self::activations),
    /// so activation churn always finds a free seat.
    pub seats: u32,
    /// Term in years (1 or 2, allowed for both editions).
    pub term_years: u32,
    /// Bound workstations: 1 or 2.
    pub activations: u32,
    /// Days before `now` the license started (under a year: all are valid).
    pub started_days_ago: i64,
}

impl SeedPlan {
    /// Number of classes of (edition, seats). License `i` and code `j` are of
    /// class `i % CLASSES` and `j % CLASSES`.
    pub const CLASSES: usize = 6;

    /// Edition and seats of a class.
    pub fn class(class: usize) -> (Edition, u32) {
        let edition = if class.is_multiple_of(2) {
            Edition::Business
        } else {
            Edition::Personal
        };
        (edition, 3 + (class % Self::CLASSES / 2) as u32)
    }

    /// The shape of license `i`.
    pub fn shape(i: usize) -> LicenseShape {
        let class = i % Self::CLASSES;
        let (edition, seats) = Self::class(class);
        let turn = (i / Self::CLASSES) % 2;
        LicenseShape {
            class,
            edition,
            seats,
            term_years: 1 + turn as u32,
            activations: 1 + ((i / (2 * Self::CLASSES)) % 2) as u32,
            started_days_ago: (i.wrapping_mul(7919) % 300) as i64,
        }
    }

    /// Fingerprint of the `j`-th workstation bound to license `i`.
    pub fn fingerprint(i: usize, j: u32) -> String {
        format!("seed-{i}-{j}")
    }

    /// Edition and seats of renewal code `j` (a one-year code).
    pub fn code_class(j: usize) -> usize {
        j % Self::CLASSES
    }
}

/// What was seeded.
pub struct Seeded {
    /// The license keys, by index.
    pub keys: Vec<LicenseKey>,
    /// The renewal codes, by index (code `j` fits the licenses of class
    /// [`SeedPlan::code_class`]`(j)`).
    pub codes: Vec<RenewalCode>,
    /// Activations written.
    pub activations: u64,
}

/// One license's column values (but its key).
pub(super) struct Row {
    pub(super) shape: LicenseShape,
    pub(super) starts_at: i64,
    pub(super) expires_at: i64,
}

pub(super) fn license_row(plan: &SeedPlan, i: usize) -> StoreResult<Row> {
    let shape = SeedPlan::shape(i);
    let starts = plan.now - Duration::days(shape.started_days_ago);
    let expires = add_years(starts, shape.term_years)
        .ok_or_else(|| StoreError::Internal("seed date out of range".into()))?;
    Ok(Row {
        shape,
        starts_at: micros(starts),
        expires_at: micros(expires),
    })
}

/// The plan's keys, sorted: license i gets the i-th smallest key, so the
/// unique index on license_key grows at its end instead of splitting random
/// pages (the keys stay random; only their numbering is sorted).
pub(super) fn sorted_keys(plan: &SeedPlan) -> Vec<LicenseKey> {
    let mut keys = (0..plan.licenses)
        .map(|_| LicenseKey::generate(&plan.product, LicenseKind::Standard))
        .collect::<Vec<_>>();
    keys.sort_unstable_by(|a, b| a.normalized().cmp(b.normalized()));
    keys
}

pub(super) fn refuse_unless_empty(licenses: i64) -> StoreResult<()> {
    if licenses > 0 {
        return Err(StoreError::Internal(format!(
            "bench seeding needs a fresh database; this one holds {licenses} licenses"
        )));
    }
    Ok(())
}
