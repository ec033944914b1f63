use super::mirror::{CHUNK, Entry};
use super::*;
use crate::domain::ProductCode;
use crate::domain::Version;

fn product(code: &str, grace: u32, latest: &str) -> ProductPolicy {
    ProductPolicy {
        code: code.into(),
        grace_period_months: grace,
        latest_version: Some(Arc::new(Version::parse(latest).unwrap())),
        offline_lease_days: 21,
    }
}

fn key() -> LicenseKey {
    LicenseKey::generate(&ProductCode::parse("ACME").unwrap(), LicenseKind::Standard)
}

fn row(key: &LicenseKey, fps: &[&str]) -> LicenseRow {
    LicenseRow {
        key: key.normalized().to_string(),
        product: "ACME".into(),
        edition: Edition::Business,
        kind: LicenseKind::Standard,
        status: LicenseStatus::Active,
        expires_at: 1_800_000_000_000_000,
        seats: 3,
        seats_used: fps.len() as u32,
        fingerprints: fps.iter().map(|f| f.to_string()).collect(),
    }
}

/// A cache loaded with `rows` by one complete poll.
fn loaded(rows: &[LicenseRow]) -> ValidationCache {
    let c = ValidationCache::new();
    poll(&c, rows);
    c.finish_load();
    c
}

fn poll(c: &ValidationCache, rows: &[LicenseRow]) -> Instant {
    let p = c.begin_poll();
    c.apply_products(&p, vec![product("ACME", 1, "2.0")]);
    c.apply(&p, rows);
    c.finish_poll(&p);
    p.started
}

fn found(a: Answer) -> ValidationView {
    match a {
        Answer::Found(v) => v,
        other => panic!("expected an answer from memory, got {other:?}"),
    }
}

#[test]
fn an_entry_stays_within_56_bytes() {
    assert!(
        std::mem::size_of::<Entry>() <= 56,
        "{}",
        std::mem::size_of::<Entry>()
    );
}

#[test]
fn nothing_is_answered_before_the_first_load_finishes() {
    let k = key();
    let c = ValidationCache::new();
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    poll(&c, &[row(&k, &[])]);
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    c.finish_load();
    assert!(matches!(
        c.lookup(&k, None, Instant::now()),
        Answer::Found(_)
    ));
}

#[test]
fn a_loaded_license_is_answered_with_every_field_and_its_fingerprints() {
    let k = key();
    let c = loaded(&[row(&k, &["fp-1", "fp-2"])]);
    let now = Instant::now();
    let v = found(c.lookup(&k, Some("fp-2"), now));
    assert_eq!(
        v,
        ValidationView {
            standing: Standing {
                status: LicenseStatus::Active,
                kind: LicenseKind::Standard,
                expires_at: DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap(),
                grace_period_months: 1,
            },
            edition: Edition::Business,
            seats: 3,
            seats_used: 2,
            fingerprint_bound: Some(true),
            latest_version: Some(Arc::new(Version::parse("2.0").unwrap())),
            offline_lease_days: 21,
        }
    );
    assert_eq!(
        found(c.lookup(&k, Some("fp-3"), now)).fingerprint_bound,
        Some(false)
    );
    assert_eq!(found(c.lookup(&k, None, now)).fingerprint_bound, None);
}

#[test]
fn a_key_the_cache_does_not_hold_is_left_to_the_database_never_answered_missing() {
    // Perhaps issued a moment ago on another replica: only the database
    // may say that no such license exists.
    let c = loaded(&[row(&key(), &[])]);
    assert!(c.is_fresh(Instant::now()));
    assert_eq!(c.lookup(&key(), None, Instant::now()), Answer::AskDatabase);
}

#[test]
fn every_status_kind_and_edition_round_trips() {
    let c = loaded(&[]);
    for status in [
        LicenseStatus::Active,
        LicenseStatus::Suspended,
        LicenseStatus::Revoked,
    ] {
        for kind in [LicenseKind::Standard, LicenseKind::Promo, LicenseKind::Nfr] {
            for edition in [Edition::Personal, Edition::Business] {
                let k = LicenseKey::generate(&ProductCode::parse("ACME").unwrap(), kind);
                let r = LicenseRow {
                    status,
                    kind,
                    edition,
                    ..row(&k, &["fp"])
                };
                poll(&c, &[r]);
                let v = found(c.lookup(&k, None, Instant::now()));
                assert_eq!(
                    (v.standing.status, v.standing.kind, v.edition),
                    (status, kind, edition)
                );
            }
        }
    }
}

#[test]
fn the_cache_stops_answering_when_polls_stop() {
    let k = key();
    let c = loaded(&[row(&k, &[])]);
    let started = poll(&c, &[]);
    assert!(matches!(
        c.lookup(
            &k,
            None,
            started + DEFAULT_MAX_STALENESS - Duration::from_millis(1)
        ),
        Answer::Found(_)
    ));
    assert_eq!(
        c.lookup(&k, None, started + DEFAULT_MAX_STALENESS),
        Answer::AskDatabase
    );
    // The next poll makes it answer again.
    let started = poll(&c, &[]);
    assert!(matches!(c.lookup(&k, None, started), Answer::Found(_)));
}

#[test]
fn a_local_write_is_read_from_the_database_until_a_later_poll_rereads_it() {
    let k = key();
    let c = loaded(&[row(&k, &["fp-1"])]);
    // A poll starts, reads the license as it was...
    let early = c.begin_poll();
    let before_write = row(&k, &["fp-1"]);
    // ...a write on this replica commits and marks it...
    c.mark_changed(&k);
    assert_eq!(c.stats().pending, 1);
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    // ...and the early poll's (possibly older) copy does not clear the mark.
    c.apply_products(&early, vec![product("ACME", 1, "2.0")]);
    c.apply(&early, &[before_write]);
    c.finish_poll(&early);
    assert_eq!(
        c.lookup(&k, Some("fp-1"), Instant::now()),
        Answer::AskDatabase
    );
    // A poll that started after the mark re-reads it and clears it.
    let later = c.begin_poll();
    assert_eq!(later.pending, vec![k.normalized().to_string()]);
    c.apply_products(&later, vec![product("ACME", 1, "2.0")]);
    c.apply(&later, &[row(&k, &[])]);
    c.finish_poll(&later);
    assert_eq!(c.stats().pending, 0);
    let v = found(c.lookup(&k, Some("fp-1"), Instant::now()));
    assert_eq!((v.fingerprint_bound, v.seats_used), (Some(false), 0));
}

#[test]
fn a_license_issued_here_is_not_reported_missing_before_it_is_read() {
    let c = loaded(&[]);
    let k = key();
    c.mark_changed(&k);
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    let p = c.begin_poll();
    c.apply_products(&p, vec![product("ACME", 1, "2.0")]);
    c.apply(&p, &[row(&k, &[])]);
    c.finish_poll(&p);
    assert!(matches!(
        c.lookup(&k, None, Instant::now()),
        Answer::Found(_)
    ));
}

#[test]
fn a_mark_for_a_license_that_never_committed_is_dropped_and_the_database_keeps_answering() {
    let c = loaded(&[]);
    let k = key();
    c.mark_changed(&k);
    let p = c.begin_poll();
    c.drop_pending_missing(&p, &p.pending.clone());
    c.finish_poll(&p);
    assert_eq!(c.stats().pending, 0);
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    assert_eq!(
        c.stats().licenses,
        0,
        "nothing is held for a key that does not exist"
    );
}

#[test]
fn while_the_change_listener_is_down_the_cache_answers_only_after_a_poll_that_started_once_it_was_back()
 {
    let k = key();
    let c = loaded(&[row(&k, &[])]);
    assert!(matches!(
        c.lookup(&k, None, Instant::now()),
        Answer::Found(_)
    ));
    c.listener_lost();
    assert!(!c.stats().listening);
    // Polls go on, but a notification may have been lost: no answers.
    let during = c.begin_poll();
    c.apply_products(&during, vec![product("ACME", 1, "2.0")]);
    c.listener_ready();
    c.finish_poll(&during);
    assert_eq!(
        c.lookup(&k, None, Instant::now()),
        Answer::AskDatabase,
        "that poll started before the listener was back"
    );
    let after = c.begin_poll();
    c.apply_products(&after, vec![product("ACME", 1, "2.0")]);
    c.apply(&after, &[row(&k, &[])]);
    c.finish_poll(&after);
    assert!(c.stats().listening);
    assert!(matches!(
        c.lookup(&k, None, Instant::now()),
        Answer::Found(_)
    ));
}

#[test]
fn with_the_listener_and_the_database_gone_the_cache_answers_within_its_bound_until_a_poll_succeeds()
 {
    let k = key();
    let c = ValidationCache::with_max_staleness(Duration::from_secs(3));
    let last = poll(&c, &[row(&k, &[])]);
    c.finish_load();
    c.listener_lost();
    // Only the listening connection is gone: no answers from memory.
    assert_eq!(c.lookup(&k, None, last), Answer::AskDatabase);
    // The database went away with the listener: no poll succeeds, and the
    // cache answers within the bound of the last one, not beyond.
    c.database_unreachable();
    let within = last + Duration::from_millis(2_900);
    assert!(matches!(c.lookup(&k, None, within), Answer::Found(_)));
    assert_eq!(
        c.lookup(&k, None, last + Duration::from_secs(3)),
        Answer::AskDatabase
    );
    // Lost again while down (the listener retrying): nothing changes.
    c.listener_lost();
    assert!(matches!(c.lookup(&k, None, within), Answer::Found(_)));
    // A poll that started before the loss finishes after it: it says
    // nothing about the database now.
    let c2 = ValidationCache::with_max_staleness(Duration::from_secs(3));
    poll(&c2, &[row(&k, &[])]);
    c2.finish_load();
    let before = c2.begin_poll();
    c2.listener_lost();
    c2.database_unreachable();
    c2.apply_products(&before, vec![product("ACME", 1, "2.0")]);
    c2.finish_poll(&before);
    assert!(matches!(
        c2.lookup(&k, None, before.started),
        Answer::Found(_)
    ));
    // A poll succeeds while the listener is still down: the database
    // answers, and a notification may have been missed: no answers.
    let during = poll(&c, &[row(&k, &[])]);
    assert_eq!(c.lookup(&k, None, during), Answer::AskDatabase);
    c.listener_lost();
    assert_eq!(c.lookup(&k, None, during), Answer::AskDatabase);
    // Back, and a poll that started after: answers again.
    c.listener_ready();
    let after = poll(&c, &[row(&k, &[])]);
    assert!(matches!(c.lookup(&k, None, after), Answer::Found(_)));
}

#[test]
fn a_cache_whose_listener_was_never_up_does_not_answer_after_its_load() {
    let k = key();
    let c = ValidationCache::new();
    c.listener_lost();
    let at = poll(&c, &[row(&k, &[])]);
    c.finish_load();
    assert_eq!(c.lookup(&k, None, at), Answer::AskDatabase);
}

#[test]
fn a_notification_for_keys_another_replica_wrote_marks_them_until_a_later_poll() {
    let (a, b) = (key(), key());
    let c = loaded(&[row(&a, &["fp"]), row(&b, &[])]);
    c.mark_all_changed(&[a.clone(), b.clone(), key()]);
    assert_eq!(c.lookup(&a, None, Instant::now()), Answer::AskDatabase);
    assert_eq!(c.lookup(&b, None, Instant::now()), Answer::AskDatabase);
    assert_eq!(c.stats().pending, 3);
    let p = c.begin_poll();
    assert_eq!(p.pending.len(), 3);
    c.apply_products(&p, vec![product("ACME", 1, "2.0")]);
    c.apply(&p, &[row(&a, &[]), row(&b, &["fp"])]);
    let missing: Vec<String> = p
        .pending
        .iter()
        .filter(|k| *k != a.normalized() && *k != b.normalized())
        .cloned()
        .collect();
    c.drop_pending_missing(&p, &missing);
    c.finish_poll(&p);
    assert_eq!(c.stats().pending, 0);
    assert_eq!(
        found(c.lookup(&a, Some("fp"), Instant::now())).fingerprint_bound,
        Some(false)
    );
    assert_eq!(
        found(c.lookup(&b, Some("fp"), Instant::now())).fingerprint_bound,
        Some(true)
    );
}

#[test]
fn a_product_change_here_is_read_from_the_database_until_a_later_poll_rereads_products() {
    let k = key();
    let c = loaded(&[row(&k, &[])]);
    let early = c.begin_poll();
    c.mark_products_changed();
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    c.apply_products(&early, vec![product("ACME", 1, "2.0")]);
    c.finish_poll(&early);
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    let later = c.begin_poll();
    c.apply_products(&later, vec![product("ACME", 6, "3.1")]);
    c.finish_poll(&later);
    let v = found(c.lookup(&k, None, Instant::now()));
    assert_eq!(v.standing.grace_period_months, 6);
    assert_eq!(v.latest_version.unwrap().as_str(), "3.1");
}

#[test]
fn a_row_whose_seat_count_disagrees_with_its_activations_is_left_to_the_database() {
    let k = key();
    let mut r = row(&k, &["fp-1"]);
    r.seats_used = 2;
    let c = loaded(&[r]);
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
}

#[test]
fn a_license_of_an_unknown_product_is_left_to_the_database_and_reread() {
    let k = key();
    let c = loaded(&[]);
    let p = c.begin_poll();
    c.apply(
        &p,
        &[LicenseRow {
            product: "NEWP".into(),
            ..row(&k, &[])
        }],
    );
    c.finish_poll(&p);
    assert_eq!(c.lookup(&k, None, Instant::now()), Answer::AskDatabase);
    assert_eq!(c.begin_poll().pending, vec![k.normalized().to_string()]);
}

#[test]
fn more_licenses_than_one_chunk_are_all_found_and_updated_in_place() {
    let keys: Vec<LicenseKey> = (0..CHUNK + 100).map(|_| key()).collect();
    let rows: Vec<LicenseRow> = keys.iter().map(|k| row(k, &["fp"])).collect();
    let c = loaded(&rows);
    assert_eq!(c.stats().licenses, keys.len());
    let now = Instant::now();
    for k in &keys {
        assert_eq!(
            found(c.lookup(k, Some("fp"), now)).fingerprint_bound,
            Some(true)
        );
    }
    // Re-reading a license replaces its entry; it does not add one.
    let last = keys.last().unwrap();
    poll(
        &c,
        &[LicenseRow {
            status: LicenseStatus::Revoked,
            ..row(last, &["fp"])
        }],
    );
    assert_eq!(c.stats().licenses, keys.len());
    assert_eq!(
        found(c.lookup(last, None, Instant::now())).standing.status,
        LicenseStatus::Revoked
    );
}
