//! The small enums the rest of the domain shares: a product's editions, a
//! license's kind and administrative status, a renewal code's state.
//!
//! This module imports nothing of the domain, so every other domain module
//! can use it without an import running back.

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Stable upper-case name, used in storage and error metadata.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            /// Inverse of `as_str`.
            pub fn from_str_opt(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum!(
    /// Product edition.
    Edition {
        /// PERSONAL: 1 or 2 years.
        Personal => "PERSONAL",
        /// BUSINESS: 1, 2 or 3 years.
        Business => "BUSINESS",
    }
);

named_enum!(
    /// Commercial kind of a license (R9).
    LicenseKind {
        /// Sold normally; renewable.
        Standard => "STANDARD",
        /// Promotional; never renewable.
        Promo => "PROMO",
        /// Partner not-for-resale; never renewable.
        Nfr => "NFR",
    }
);

named_enum!(
    /// Administrative state (R11).
    LicenseStatus {
        /// In force.
        Active => "ACTIVE",
        /// Not valid until reinstated.
        Suspended => "SUSPENDED",
        /// Final.
        Revoked => "REVOKED",
    }
);

named_enum!(
    /// Lifecycle of a renewal code.
    CodeState {
        /// Issued, not used.
        Unredeemed => "UNREDEEMED",
        /// Used once.
        Redeemed => "REDEEMED",
        /// Voided.
        Void => "VOID",
    }
);
