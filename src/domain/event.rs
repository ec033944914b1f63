//! The kinds of history event a license has (`license_events.type`; the
//! schema's CHECK lists the same).

/// Every event type, in the order of a license's life.
pub const EVENT_TYPES: &[&str] = &[
    "issued",
    "activated",
    "deactivated",
    "renewed",
    "renewal_refused",
    "suspended",
    "reinstated",
    "revoked",
];

/// Whether `name` is an event type.
pub fn is_event_type(name: &str) -> bool {
    EVENT_TYPES.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_types_are_the_schemas() {
        for migration in [
            include_str!("../../migrations/sqlite/0001_init.sql"),
            include_str!("../../migrations/postgres/0001_init.sql"),
        ] {
            let check = migration
                .split("CREATE TABLE license_events")
                .nth(1)
                .and_then(|t| t.split("type IN (").nth(1))
                .and_then(|t| t.split(')').next())
                .expect("license_events has a type CHECK");
            let listed: Vec<&str> = check
                .split(',')
                .map(|t| t.trim().trim_matches('\''))
                .collect();
            assert_eq!(listed, EVENT_TYPES);
        }
        assert!(is_event_type("renewed"));
        assert!(!is_event_type("Renewed"));
        assert!(!is_event_type(""));
    }
}
