//! The validation cache (Validate answered from memory), the task that
//! keeps it in step with the database (its feed), and the loader that
//! turns the database's rows into its entries. The writes above it only
//! mark what they changed ([`validation_cache::ValidationCache::mark_changed`]).

mod feed;
pub(in crate::store) mod loader;
pub mod validation_cache;

pub(super) use feed::{Feed, Source};
