//! The rows of credentials: API tokens and the keys that sign offline
//! certificates (re-exported by [`super`]).

use super::{Columns, corrupt};
use crate::domain::auth::Role;
use crate::signing::{KeyState, StoredKey};
use crate::store::{StoreResult, TokenRecord, from_micros};

/// An API token's columns, in the order [`token_col`] reads them.
macro_rules! token_select {
    () => {
        "SELECT id, name, role, secret_hash, created_at, revoked_at FROM api_tokens "
    };
}
pub(in crate::store) use token_select;

/// Positions of `token_select!`'s columns.
pub(in crate::store) mod token_col {
    pub const ID: usize = 0;
    pub const NAME: usize = 1;
    pub const ROLE: usize = 2;
    pub const SECRET_HASH: usize = 3;
    pub const CREATED_AT: usize = 4;
    pub const REVOKED_AT: usize = 5;
    /// Every column's name, by position.
    #[cfg(test)]
    pub const NAMES: [&str; 6] = [
        "id",
        "name",
        "role",
        "secret_hash",
        "created_at",
        "revoked_at",
    ];
}

/// A token from the columns of `token_select!` (any backend).
pub(in crate::store) fn token_from_row(row: &impl Columns) -> StoreResult<TokenRecord> {
    use token_col as c;
    let role = row.text(c::ROLE)?;
    Ok(TokenRecord {
        id: row.text(c::ID)?,
        name: row.text(c::NAME)?,
        role: Role::parse(&role).ok_or_else(|| corrupt("role", &role))?,
        secret_hash: row.blob(c::SECRET_HASH)?,
        created_at: from_micros(row.int(c::CREATED_AT)?)?,
        revoked_at: row.opt_int(c::REVOKED_AT)?.map(from_micros).transpose()?,
    })
}

/// A signing key's columns, in the order [`key_col`] reads them.
macro_rules! signing_key_select {
    () => {
        "SELECT kid, private_der, public_key, state, created_at, retired_at FROM signing_keys "
    };
}
pub(in crate::store) use signing_key_select;

/// Positions of `signing_key_select!`'s columns.
pub(in crate::store) mod key_col {
    pub const KID: usize = 0;
    pub const PRIVATE_DER: usize = 1;
    pub const PUBLIC_KEY: usize = 2;
    pub const STATE: usize = 3;
    pub const CREATED_AT: usize = 4;
    pub const RETIRED_AT: usize = 5;
    /// Every column's name, by position.
    #[cfg(test)]
    pub const NAMES: [&str; 6] = [
        "kid",
        "private_der",
        "public_key",
        "state",
        "created_at",
        "retired_at",
    ];
}

/// A signing key from the columns of `signing_key_select!` (any backend).
pub(in crate::store) fn signing_key_from_row(row: &impl Columns) -> StoreResult<StoredKey> {
    use key_col as c;
    let state = row.text(c::STATE)?;
    Ok(StoredKey {
        kid: row.text(c::KID)?,
        private_der: row.blob(c::PRIVATE_DER)?,
        public_key: row.blob(c::PUBLIC_KEY)?,
        state: KeyState::parse(&state).ok_or_else(|| corrupt("key state", &state))?,
        created_at: from_micros(row.int(c::CREATED_AT)?)?,
        retired_at: row.opt_int(c::RETIRED_AT)?.map(from_micros).transpose()?,
    })
}
