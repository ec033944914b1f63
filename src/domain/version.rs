//! Product versions: dotted numbers compared numerically (R6).

use std::cmp::Ordering;
use std::fmt;

/// A version such as `4.10.0`: one to six dot-separated decimal numbers.
/// Missing trailing components count as zero, so `4.10` equals `4.10.0`.
#[derive(Debug, Clone)]
pub struct Version {
    parts: Vec<u32>,
    text: String,
}

/// Longest version string accepted.
pub const MAX_VERSION_LEN: usize = 64;

impl Version {
    /// Parses `4.10.0`; refuses empty components, signs, letters and more than
    /// six components.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > MAX_VERSION_LEN {
            return Err("a version is 1 to 64 characters of dotted numbers".into());
        }
        let parts = s
            .split('.')
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    Err(format!("{s:?} is not a dotted version such as 4.10.0"))
                } else {
                    p.parse::<u32>()
                        .map_err(|_| format!("{s:?} has a component that is too large"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if parts.len() > 6 {
            return Err(format!("{s:?} has more than six components"));
        }
        Ok(Version {
            parts,
            text: s.to_string(),
        })
    }

    /// The version as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        (0..n)
            .map(|i| {
                let a = self.parts.get(i).copied().unwrap_or(0);
                let b = other.parts.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn r6_versions_compare_as_dotted_numbers() {
        assert!(v("4.10.0") > v("4.9.2"));
        assert!(v("4.9.2") < v("4.10.0"));
        assert!(v("10.0") > v("9.99.99"));
    }

    #[test]
    fn r6_missing_components_count_as_zero() {
        assert_eq!(v("4.10"), v("4.10.0"));
        assert!(v("4.10.0.1") > v("4.10"));
    }

    #[test]
    fn r6_malformed_versions_are_refused() {
        for bad in [
            "",
            "4..1",
            "v4.1",
            "4.1-beta",
            "-1",
            "4.1.",
            "1.2.3.4.5.6.7",
            "99999999999",
        ] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
    }
}
