//! What goes over the notification channel: the tokens a replica sends,
//! the statements that send them, and the parsing of what arrives.

use crate::domain::LicenseKey;

/// The notification channel.
pub const CHANNEL: &str = "licensd_changes";

/// PostgreSQL refuses payloads of 8,000 bytes or more.
const MAX_PAYLOAD: usize = 7_000;

/// What a write changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// One license.
    License(LicenseKey),
    /// A product (Validate reads latest version and grace period).
    Products,
}

/// One token of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Token {
    Change(Change),
    /// "I have marked your batches up to this one."
    Ack {
        replica: u64,
        batch: u64,
    },
    /// "I listen: wait for my acknowledgements."
    Hello,
    /// Hello, and "I did not listen before this: whatever you sent earlier
    /// my poll reads; wait for me from now on".
    Join,
    /// "Who acknowledges? Say hello." (A replica without a cache.)
    Probe,
    /// "I no longer listen."
    Goodbye,
}

/// The channel on which `replica` hears acknowledgements of its batches
/// (only it listens there, so no other replica reads them).
pub(super) fn ack_channel(replica: u64) -> String {
    format!("{CHANNEL}_acks_{replica:x}")
}

/// The statements that send `tokens` as batch `batch_no` of `replica`:
/// changes, hello and goodbye on [`CHANNEL`], each acknowledgement on its
/// writer's [`ack_channel`]. Duplicates are dropped and acknowledgements of
/// one replica's batches folded into the highest. Several statements in one
/// simple query run as one transaction; the connection has
/// `synchronous_commit = off`.
pub(super) fn notify_sql<'a>(
    replica: u64,
    batch_no: u64,
    tokens: impl Iterator<Item = &'a Token>,
) -> String {
    let header = format!("{replica:x}:{batch_no}");
    let mut words: Vec<String> = Vec::new();
    let (mut products, mut probe) = (false, false);
    // The last of hello, join and goodbye in queue order says whether this
    // replica listens; a join stays a join if a hello follows it.
    let mut presence: Option<&Token> = None;
    let mut acks: Vec<(u64, u64)> = Vec::new();
    for token in tokens {
        match token {
            Token::Change(Change::License(key)) => words.push(key.normalized().to_string()),
            Token::Change(Change::Products) => products = true,
            Token::Ack { replica, batch } => match acks.iter_mut().find(|(r, _)| r == replica) {
                Some((_, b)) => *b = (*b).max(*batch),
                None => acks.push((*replica, *batch)),
            },
            Token::Hello if presence == Some(&Token::Join) => {}
            Token::Hello | Token::Join | Token::Goodbye => presence = Some(token),
            Token::Probe => probe = true,
        }
    }
    words.extend(products.then(|| "*".to_string()));
    match presence {
        Some(Token::Goodbye) => words.push("-".to_string()),
        Some(Token::Hello) => words.push("+".to_string()),
        Some(Token::Join) => words.extend(["+".to_string(), "^".to_string()]),
        _ => {}
    }
    words.extend(probe.then(|| "?".to_string()));
    let mut notifications: Vec<(String, String)> = Vec::new();
    for word in &words {
        match notifications.last_mut() {
            Some((_, last)) if last.len() + 1 + word.len() <= MAX_PAYLOAD => {
                last.push(' ');
                last.push_str(word);
            }
            _ => notifications.push((CHANNEL.to_string(), format!("{header} {word}"))),
        }
    }
    for (origin, batch) in acks {
        notifications.push((ack_channel(origin), format!("{header} {origin:x}:{batch}")));
    }
    let mut sql = String::new();
    for (channel, payload) in &notifications {
        // A payload holds only [0-9a-f:], A-Z, 0-9, '*', '+', '^', '?',
        // '-' and spaces, a channel [a-z0-9_]: no quote can end the literal.
        debug_assert!(
            payload
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " :*+^?-".contains(c))
        );
        sql.push_str(&format!("NOTIFY {channel}, '{payload}'; "));
    }
    sql
}

/// What one notification says.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Parsed {
    pub(super) replica: Option<u64>,
    pub(super) batch_no: u64,
    pub(super) keys: Vec<LicenseKey>,
    pub(super) products: bool,
    pub(super) acks: Vec<(u64, u64)>,
    pub(super) hello: bool,
    pub(super) joined: bool,
    pub(super) probe: bool,
    pub(super) goodbye: bool,
}

pub(super) fn replica_and_batch(token: &str) -> Option<(u64, u64)> {
    let (replica, batch) = token.split_once(':')?;
    Some((u64::from_str_radix(replica, 16).ok()?, batch.parse().ok()?))
}

pub(super) fn parse_payload(payload: &str) -> Parsed {
    let mut tokens = payload.split_ascii_whitespace();
    let mut parsed = Parsed::default();
    if let Some((replica, batch)) = tokens.next().and_then(replica_and_batch) {
        parsed.replica = Some(replica);
        parsed.batch_no = batch;
    }
    for token in tokens {
        match token {
            "*" => parsed.products = true,
            "+" => parsed.hello = true,
            "^" => parsed.joined = true,
            "?" => parsed.probe = true,
            "-" => parsed.goodbye = true,
            _ if token.contains(':') => parsed.acks.extend(replica_and_batch(token)),
            _ => parsed.keys.extend(LicenseKey::parse(token).ok()),
        }
    }
    parsed
}

/// The `application_name` of `replica`'s listening connection.
pub(super) fn listener_name(replica: u64) -> String {
    format!("licensd listener {replica:x}")
}
