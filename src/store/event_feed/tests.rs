use super::horizon::{MAX_PENDING, passed};
use super::*;
use crate::domain::LicenseKey;

#[test]
fn a_pair_passes_once_xmin_reaches_its_bound() {
    let mut pending = VecDeque::new();
    // A write in flight (xid 10) while id 5 was the last taken.
    assert_eq!(passed(&mut pending, (5, 11), 10, 0), 0);
    // It finished; another (xid 12) is in flight, id 7 taken.
    assert_eq!(passed(&mut pending, (7, 13), 12, 0), 5);
    // Nothing in flight: everything read so far is final.
    assert_eq!(passed(&mut pending, (7, 13), 13, 5), 7);
    assert!(pending.is_empty());
}

#[test]
fn the_horizon_never_moves_back() {
    let mut pending = VecDeque::new();
    assert_eq!(passed(&mut pending, (9, 20), 20, 0), 9);
    // A stale read (a replica's own view lags): the horizon stays.
    assert_eq!(passed(&mut pending, (3, 5), 20, 9), 9);
}

#[test]
fn pending_pairs_are_bounded_and_the_newest_is_kept() {
    let mut pending = VecDeque::new();
    for i in 0..(MAX_PENDING as i64 * 3) {
        assert_eq!(passed(&mut pending, (i, 1_000 + i), 1, 0), 0);
    }
    assert!(pending.len() <= MAX_PENDING);
    let newest = MAX_PENDING as i64 * 3 - 1;
    assert_eq!(pending.back(), Some(&(newest, 1_000 + newest)));
    assert_eq!(
        passed(&mut pending, (newest, 1_000 + newest), 5_000, 0),
        newest
    );
}

fn event(id: i64, product: &str, kind: &str) -> LicenseEvent {
    LicenseEvent {
        id,
        event_type: kind.into(),
        at: chrono::DateTime::UNIX_EPOCH,
        actor: String::new(),
        fingerprint: String::new(),
        old_expires_at: None,
        new_expires_at: None,
        renewal_code_id: None,
        refusal_reason: String::new(),
        detail: String::new(),
        license_key: LicenseKey::generate(
            &crate::domain::ProductCode::parse(product).expect("a product code"),
            crate::domain::LicenseKind::Standard,
        ),
        product: product.into(),
    }
}

#[test]
fn filters_by_product_and_type() {
    let all = EventFilter::default();
    let cad = EventFilter {
        product: Some("CAD".into()),
        types: vec![],
    };
    let renewals = EventFilter {
        product: None,
        types: vec!["renewed".into(), "renewal_refused".into()],
    };
    let e = event(1, "CAD", "activated");
    assert!(all.matches(&e));
    assert!(cad.matches(&e));
    assert!(!renewals.matches(&e));
    let r = event(2, "CAM", "renewed");
    assert!(!cad.matches(&r));
    assert!(renewals.matches(&r));
}
