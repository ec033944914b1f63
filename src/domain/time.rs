//! Calendar arithmetic in UTC (R1, R3).

use chrono::{DateTime, Months, Utc};

/// `t` plus `years` calendar years. A date that does not exist in the target
/// year (29 February) falls back to the last day of the month, so a license
/// issued 2024-02-29 for one year ends 2025-02-28 at the same time of day.
pub fn add_years(t: DateTime<Utc>, years: u32) -> Option<DateTime<Utc>> {
    t.checked_add_months(Months::new(years.checked_mul(12)?))
}

/// `t` plus `months` calendar months (clamped to the month's last day).
pub fn add_months(t: DateTime<Utc>, months: u32) -> Option<DateTime<Utc>> {
    t.checked_add_months(Months::new(months))
}

/// `t` truncated to whole microseconds, the precision the store keeps.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn r1_a_leap_day_plus_one_year_is_the_last_of_february() {
        assert_eq!(
            add_years(at("2024-02-29T10:00:00Z"), 1),
            Some(at("2025-02-28T10:00:00Z"))
        );
        assert_eq!(
            add_years(at("2024-02-29T10:00:00Z"), 4),
            Some(at("2028-02-29T10:00:00Z"))
        );
    }

    #[test]
    fn r1_years_are_calendar_years_not_365_days() {
        // 2023-03-01 + 1 year crosses 29 Feb 2024: 366 days.
        let start = at("2023-03-01T00:00:00Z");
        let end = add_years(start, 1).unwrap();
        assert_eq!(end, at("2024-03-01T00:00:00Z"));
        assert_eq!((end - start).num_days(), 366);
    }

    #[test]
    fn r3_a_month_after_the_31st_of_january_is_the_end_of_february() {
        assert_eq!(
            add_months(at("2025-01-31T12:00:00Z"), 1),
            Some(at("2025-02-28T12:00:00Z"))
        );
    }
}
