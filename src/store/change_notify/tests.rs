use super::progress::Peer;
use super::wire::{Parsed, notify_sql, parse_payload};
use super::*;
use crate::domain::{LicenseKey, LicenseKind, ProductCode};

fn key() -> LicenseKey {
    LicenseKey::generate(&ProductCode::parse("ACME").unwrap(), LicenseKind::Standard)
}

#[test]
fn a_batch_round_trips_through_its_payload() {
    let (a, b) = (key(), key());
    let changes = [
        Token::Change(Change::License(a.clone())),
        Token::Change(Change::Products),
        Token::Ack {
            replica: 0xdef,
            batch: 3,
        },
        Token::Change(Change::License(b.clone())),
        Token::Change(Change::Products),
        Token::Ack {
            replica: 0xdef,
            batch: 9,
        },
        Token::Ack {
            replica: 0x12,
            batch: 4,
        },
        Token::Hello,
    ];
    let sql = notify_sql(0xabc, 7, changes.iter());
    let sent = notifications(&sql);
    assert_eq!(sent.len(), 3, "{sql}");
    let (channel, payload) = &sent[0];
    assert_eq!(channel, CHANNEL);
    assert_eq!(
        parse_payload(payload),
        Parsed {
            replica: Some(0xabc),
            batch_no: 7,
            keys: vec![a, b],
            products: true,
            acks: vec![],
            hello: true,
            joined: false,
            probe: false,
            goodbye: false,
        }
    );
    // Each acknowledgement goes to its writer's channel only, folded
    // into the highest batch.
    let acks: Vec<(String, Parsed)> = sent[1..]
        .iter()
        .map(|(c, p)| (c.clone(), parse_payload(p)))
        .collect();
    assert_eq!(acks[0].0, "licensd_changes_acks_def");
    assert_eq!(acks[0].1.acks, vec![(0xdef, 9)]);
    assert_eq!(acks[1].0, "licensd_changes_acks_12");
    assert_eq!(acks[1].1.acks, vec![(0x12, 4)]);
    assert!(
        acks.iter()
            .all(|(_, p)| p.replica == Some(0xabc) && p.batch_no == 7)
    );
    // No transaction control: one simple query is one transaction.
    assert!(!sql.contains("BEGIN") && !sql.contains("COMMIT"));
}

/// `(channel, payload)` of each NOTIFY in `sql`.
fn notifications(sql: &str) -> Vec<(String, String)> {
    sql.split("; ")
        .filter(|s| !s.is_empty())
        .map(|s| {
            let rest = s.strip_prefix("NOTIFY ").expect("only NOTIFY statements");
            let (channel, payload) = rest.split_once(", '").unwrap();
            (
                channel.to_string(),
                payload.trim_end_matches('\'').to_string(),
            )
        })
        .collect()
}

#[test]
fn a_large_batch_is_split_into_payloads_postgresql_accepts() {
    let keys: Vec<Token> = (0..1_000)
        .map(|_| Token::Change(Change::License(key())))
        .collect();
    let sql = notify_sql(1, 2, keys.iter());
    let sent = notifications(&sql);
    assert!(sent.len() > 1);
    let mut seen = 0;
    for (channel, p) in &sent {
        assert_eq!(channel, CHANNEL);
        assert!(p.len() < 8_000);
        let parsed = parse_payload(p);
        assert_eq!((parsed.replica, parsed.batch_no), (Some(1), 2));
        seen += parsed.keys.len();
    }
    assert_eq!(seen, 1_000);
}

#[test]
fn anything_else_in_a_payload_is_ignored() {
    let k = key();
    let parsed = parse_payload(&format!("zz:q NOT-A-KEY {} ' ; DROP", k.normalized()));
    assert_eq!(parsed.replica, None);
    assert_eq!(parsed.keys, vec![k]);
    assert!(!parsed.products);
    assert_eq!(parse_payload(""), Parsed::default());
    let parsed = parse_payload("1f:2 zz:1 3:x :4 5: +");
    assert_eq!(
        (parsed.replica, parsed.acks, parsed.hello),
        (Some(0x1f), vec![], true)
    );
}

fn folded(tokens: &[Token]) -> Parsed {
    let sql = notify_sql(1, 1, tokens.iter());
    parse_payload(sql.split('\'').nth(1).unwrap())
}

#[test]
fn the_last_of_hello_join_and_goodbye_in_a_batch_wins() {
    use Token::*;
    // Shutting down: the goodbye was queued last.
    let p = folded(&[Hello, Join, Goodbye]);
    assert!(p.goodbye && !p.hello && !p.joined);
    // The listener lost and connected again: it joins.
    let p = folded(&[Hello, Goodbye, Join, Hello]);
    assert!(p.hello && p.joined && !p.goodbye);
    let p = folded(&[Goodbye, Hello]);
    assert!(p.hello && !p.joined && !p.goodbye);
    let p = folded(&[Probe, Probe]);
    assert!(p.probe && !p.hello && !p.goodbye);
}

fn said(hello: bool, joined: bool, goodbye: bool) -> Parsed {
    Parsed {
        replica: Some(9),
        hello,
        joined,
        goodbye,
        ..Parsed::default()
    }
}

#[test]
fn a_replica_that_joins_again_is_waited_for_from_then_on_even_if_it_was_late() {
    let now = Instant::now();
    let mut p = Progress {
        echo: 10,
        ..Progress::default()
    };
    assert!(
        p.heard(9, &said(true, true, false), None, now),
        "new: answered"
    );
    assert!(!p.done(11, now));
    assert!(!p.heard(9, &said(true, false, false), None, now), "known");
    // It missed batch 11 (its listener was lost): late.
    p.peers.get_mut(&9).unwrap().late = 11;
    p.echo = 12;
    assert!(p.done(12, now), "late: not waited for");
    // It joins again: waited for from batch 13 on, not for 11 or 12.
    assert!(!p.heard(9, &said(true, true, false), None, now));
    assert!(p.done(12, now));
    p.echo = 13;
    assert!(!p.done(13, now));
    assert!(!p.heard(9, &said(false, false, false), Some(13), now));
    assert!(p.done(13, now));
    // A goodbye: not waited for; its next hello is answered.
    assert!(!p.heard(9, &said(false, false, true), None, now));
    p.echo = 14;
    assert!(p.done(14, now));
    assert!(p.heard(9, &said(true, false, false), None, now));
    // A replica without a cache asks; it is answered.
    let mut asked = said(false, false, false);
    asked.probe = true;
    assert!(p.heard(8, &asked, None, now));
    assert!(!p.peers.contains_key(&8), "it is not waited for");
}

fn peer(seen: Instant, since: u64) -> Peer {
    Peer {
        seen,
        since,
        acked: since,
        late: 0,
    }
}

#[test]
fn a_batch_is_done_once_echoed_and_acknowledged_by_every_listening_replica() {
    let now = Instant::now();
    let mut p = Progress::default();
    p.peers.insert(1, peer(now, 0));
    p.peers.insert(2, peer(now, 0));
    assert!(!p.done(1, now), "not echoed");
    p.echo = 1;
    assert_eq!(sorted(p.waiting_for(1, now)), vec![1, 2]);
    p.peers.get_mut(&1).unwrap().acked = 1;
    assert_eq!(sorted(p.waiting_for(1, now)), vec![2]);
    // An acknowledgement of a later batch covers the earlier ones.
    p.peers.get_mut(&2).unwrap().acked = 5;
    assert!(p.done(1, now));
    p.echo = 5;
    assert_eq!(sorted(p.waiting_for(5, now)), vec![1]);
}

#[test]
fn a_replica_is_not_waited_for_before_its_hello_after_its_ttl_or_while_late() {
    let now = Instant::now();
    let mut p = Progress {
        echo: 10,
        ..Progress::default()
    };
    // Said hello when batch 7 had been echoed: batches up to 7 went out
    // before it listened.
    p.peers.insert(1, peer(now, 7));
    assert!(p.done(7, now));
    assert!(!p.done(8, now));
    // Silent for longer than the TTL.
    assert!(p.done(8, now + PEER_TTL));
    // Late with batch 8: not waited for until it acknowledges 8.
    p.peers.get_mut(&1).unwrap().late = 8;
    assert!(p.done(9, now));
    p.peers.get_mut(&1).unwrap().acked = 8;
    assert!(!p.done(9, now));
}

#[test]
fn a_waiting_write_is_woken_once_its_batch_is_done_and_not_before() {
    let now = Instant::now();
    let mut p = Progress::default();
    p.peers.insert(1, peer(now, 0));
    let (wake2, mut woken2) = oneshot::channel();
    let (wake3, mut woken3) = oneshot::channel();
    p.waiters.entry(2).or_default().push(wake2);
    p.waiters.entry(3).or_default().push(wake3);
    p.echo = 3;
    p.release(now);
    assert!(woken2.try_recv().is_err(), "not acknowledged yet");
    p.peers.get_mut(&1).unwrap().acked = 2;
    p.release(now);
    assert_eq!(woken2.try_recv(), Ok(()));
    assert!(woken3.try_recv().is_err());
    assert_eq!(p.done_up_to(now), 2);
    // The replica goes silent: after its TTL it is not waited for.
    p.release(now + PEER_TTL);
    assert_eq!(woken3.try_recv(), Ok(()));
    assert!(p.waiters.is_empty());
}

fn sorted(ids: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut ids: Vec<u64> = ids.collect();
    ids.sort();
    ids
}
