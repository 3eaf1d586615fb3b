//! Column families and key encoding of the state machine's RocksDB.
//!
//! Keys are tuples of components. A string component is its length as u32 big-endian followed by
//! its bytes, so a prefix made of whole components matches exactly the keys that start with those
//! components (`("a", "b")` never matches user `"bc"`). Integers are big-endian so byte order is
//! numeric order. Consequence for ordering: strings sort by (length, bytes), not alphabetically;
//! code that depends on an order (expiry) documents it that way.

/// The column families. The order of [`Cf::ALL`] is the order [`state_hash`] walks them in.
///
/// [`state_hash`]: super::StateReader::state_hash
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Cf {
    /// app id -> AppConfig
    Apps,
    /// node id BE -> NodeInfo
    Nodes,
    /// (app, user, device) -> Session
    Sessions,
    /// (node BE, app, user, device) -> () : which sessions a node holds, for NodeDown
    NodeSessions,
    /// (app, user, device) -> DeviceState
    Devices,
    /// (app, user, seq BE) -> StoredMessage
    Mail,
    /// (app, user) -> MailboxMeta
    MailMeta,
    /// (app, topic) -> TopicMeta
    TopicMeta,
    /// (app, topic, seq BE) -> TopicMessage
    TopicLog,
    /// (app, msg_id) -> Vec<(user, seq)> : where a held message lives
    MsgIdx,
    /// (app, key) -> IdemRecord : first result of an idempotent push
    Idem,
    /// (expires_ms BE, kind u8, ...) -> () : what expires when, see [`expiry_message`]
    Expiry,
    /// app -> AppCounters
    Counters,
    /// event id BE -> SessionEvent : the callback outbox
    Outbox,
    /// archive id BE -> ArchivedMessage : the archive outbox (removed messages for the cold archive)
    Archive,
    /// fixed names -> bookkeeping (last applied, membership, clocks, counters)
    Meta,
    /// (app, topic) -> RetainedMessage : a topic's retained message (topic state)
    Retained,
    /// (app, user, device) -> KeptSession : a persistent session's subscriptions (user state)
    Kept,
}

impl Cf {
    pub(crate) const ALL: [Cf; 18] = [
        Cf::Apps,
        Cf::Nodes,
        Cf::Sessions,
        Cf::NodeSessions,
        Cf::Devices,
        Cf::Mail,
        Cf::MailMeta,
        Cf::TopicMeta,
        Cf::TopicLog,
        Cf::MsgIdx,
        Cf::Idem,
        Cf::Expiry,
        Cf::Counters,
        Cf::Outbox,
        Cf::Archive,
        Cf::Meta,
        Cf::Retained,
        Cf::Kept,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Cf::Apps => "apps",
            Cf::Nodes => "nodes",
            Cf::Sessions => "sessions",
            Cf::NodeSessions => "node_sessions",
            Cf::Devices => "devices",
            Cf::Mail => "mail",
            Cf::MailMeta => "mail_meta",
            Cf::TopicMeta => "topic_meta",
            Cf::TopicLog => "topic_log",
            Cf::MsgIdx => "msg_idx",
            Cf::Idem => "idem",
            Cf::Expiry => "expiry",
            Cf::Counters => "counters",
            Cf::Outbox => "outbox",
            Cf::Archive => "archive",
            Cf::Meta => "meta",
            Cf::Retained => "retained",
            Cf::Kept => "kept",
        }
    }

    /// Column families whose keys start with the app id: DeleteApp range-deletes the app's prefix
    /// in each. (NodeSessions is keyed by node first and Expiry by time; see DeleteApp.)
    pub(crate) const APP_KEYED: [Cf; 12] = [
        Cf::Apps,
        Cf::Retained,
        Cf::Kept,
        Cf::Sessions,
        Cf::Devices,
        Cf::Mail,
        Cf::MailMeta,
        Cf::TopicMeta,
        Cf::TopicLog,
        Cf::MsgIdx,
        Cf::Idem,
        Cf::Counters,
    ];
}

/// Meta CF keys.
pub(crate) const META_LAST_APPLIED: &[u8] = b"last_applied";
pub(crate) const META_MEMBERSHIP: &[u8] = b"membership";
pub(crate) const META_CLOCKS: &[u8] = b"clocks";
/// The archive outbox's [`ArchiveState`](crate::types::ArchiveState); absent = default (off).
pub(crate) const META_ARCHIVE: &[u8] = b"archive";

/// Expiry index kinds; the byte after the time orders messages before keys at equal times.
pub(crate) const EXPIRY_MESSAGE: u8 = 0;
pub(crate) const EXPIRY_IDEM: u8 = 1;
pub(crate) const EXPIRY_LOCATION: u8 = 2;
pub(crate) const EXPIRY_RETAINED: u8 = 3;
pub(crate) const EXPIRY_KEPT: u8 = 4;

/// Builds a key from components.
#[derive(Default)]
pub(crate) struct KeyBuf(Vec<u8>);

impl KeyBuf {
    pub(crate) fn new() -> Self {
        KeyBuf(Vec::with_capacity(48))
    }
    pub(crate) fn str(mut self, s: &str) -> Self {
        // u32 length: ids are never near 4 GiB, and the prefix keeps components apart.
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub(crate) fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Reads components back out of a key (for index keys whose parts we need).
pub(crate) struct KeyReader<'a>(&'a [u8]);

impl<'a> KeyReader<'a> {
    pub(crate) fn new(key: &'a [u8]) -> Self {
        KeyReader(key)
    }
    pub(crate) fn str(&mut self) -> Option<String> {
        let len = u32::from_be_bytes(self.0.get(..4)?.try_into().ok()?) as usize;
        let bytes = self.0.get(4..4 + len)?;
        let s = String::from_utf8(bytes.to_vec()).ok()?;
        self.0 = &self.0[4 + len..];
        Some(s)
    }
    /// Steps over a string component without decoding it.
    pub(crate) fn skip_str(&mut self) -> Option<()> {
        let len = u32::from_be_bytes(self.0.get(..4)?.try_into().ok()?) as usize;
        self.0 = self.0.get(4 + len..)?;
        Some(())
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        let v = u64::from_be_bytes(self.0.get(..8)?.try_into().ok()?);
        self.0 = &self.0[8..];
        Some(v)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        let v = *self.0.first()?;
        self.0 = &self.0[1..];
        Some(v)
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The smallest key greater than every key starting with `prefix` (exclusive range end), or None
/// when no such key exists (prefix all 0xff).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// `[prefix, prefix_end)` with an unbounded end mapped to a key longer than any we write.
pub(crate) fn prefix_range(prefix: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let end = prefix_end(&prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 64]);
    (prefix, end)
}

pub(crate) fn app(app: &str) -> Vec<u8> {
    KeyBuf::new().str(app).done()
}
pub(crate) fn node(node: u64) -> Vec<u8> {
    KeyBuf::new().u64(node).done()
}
pub(crate) fn user(app: &str, user: &str) -> Vec<u8> {
    KeyBuf::new().str(app).str(user).done()
}
pub(crate) fn device(app: &str, user: &str, device: &str) -> Vec<u8> {
    KeyBuf::new().str(app).str(user).str(device).done()
}
pub(crate) fn node_session(node: u64, app: &str, user: &str, device: &str) -> Vec<u8> {
    KeyBuf::new().u64(node).str(app).str(user).str(device).done()
}
/// Parses a NodeSessions key back into (node, app, user, device).
pub(crate) fn parse_node_session(key: &[u8]) -> Option<(u64, String, String, String)> {
    let mut r = KeyReader::new(key);
    let parsed = (r.u64()?, r.str()?, r.str()?, r.str()?);
    r.is_empty().then_some(parsed)
}
pub(crate) fn mail(app: &str, user: &str, seq: u64) -> Vec<u8> {
    KeyBuf::new().str(app).str(user).u64(seq).done()
}

/// The mailbox part `(app, user)` of a Mail key: the key without its 8-byte seq. The Mail column
/// family's prefix extractor: its memtable keeps one skiplist per mailbox, so a push appends to
/// its mailbox's list instead of searching one list of every mailbox's messages. Total on every
/// key (a key shorter than a seq is its own prefix), as the hash-skiplist memtable requires.
pub(crate) fn mailbox_of(key: &[u8]) -> &[u8] {
    key.len().checked_sub(8).map_or(key, |n| &key[..n])
}

/// Whether `lo` is a whole Mail key and every key in `[lo, hi)` belongs to its mailbox, so an
/// iterator over the range may stay in that mailbox's memtable bucket (prefix mode).
pub(crate) fn within_one_mailbox(lo: &[u8], hi: &[u8]) -> bool {
    let mut r = KeyReader::new(lo);
    let whole_key = r.skip_str().is_some() && r.skip_str().is_some() && r.u64().is_some() && r.is_empty();
    if !whole_key {
        return false;
    }
    match prefix_end(mailbox_of(lo)) {
        Some(end) => hi <= end.as_slice(),
        None => false,
    }
}
pub(crate) fn topic(app: &str, topic: &str) -> Vec<u8> {
    KeyBuf::new().str(app).str(topic).done()
}
pub(crate) fn topic_msg(app: &str, topic: &str, seq: u64) -> Vec<u8> {
    KeyBuf::new().str(app).str(topic).u64(seq).done()
}
pub(crate) fn msg_idx(app: &str, msg_id: &str) -> Vec<u8> {
    KeyBuf::new().str(app).str(msg_id).done()
}
pub(crate) fn idem(app: &str, key: &str) -> Vec<u8> {
    KeyBuf::new().str(app).str(key).done()
}
pub(crate) fn outbox(id: u64) -> Vec<u8> {
    KeyBuf::new().u64(id).done()
}
pub(crate) fn archive(id: u64) -> Vec<u8> {
    KeyBuf::new().u64(id).done()
}

/// Expiry index entry of a mailbox message: (expires BE, 0, app, user, seq BE).
pub(crate) fn expiry_message(expires_ms: u64, app: &str, user: &str, seq: u64) -> Vec<u8> {
    KeyBuf::new()
        .u64(expires_ms)
        .u8(EXPIRY_MESSAGE)
        .str(app)
        .str(user)
        .u64(seq)
        .done()
}
/// Expiry index entry of an idempotency key: (expires BE, 1, app, key).
pub(crate) fn expiry_idem(expires_ms: u64, app: &str, key: &str) -> Vec<u8> {
    KeyBuf::new()
        .u64(expires_ms)
        .u8(EXPIRY_IDEM)
        .str(app)
        .str(key)
        .done()
}

/// Expiry index entry of the msg-id location of a message that was acked or trimmed before its
/// TTL: (expires BE, 2, app, msg id, user, seq BE).
pub(crate) fn expiry_location(expires_ms: u64, app: &str, msg_id: &str, user: &str, seq: u64) -> Vec<u8> {
    KeyBuf::new()
        .u64(expires_ms)
        .u8(EXPIRY_LOCATION)
        .str(app)
        .str(msg_id)
        .str(user)
        .u64(seq)
        .done()
}

/// Expiry index entry of a topic's retained message: (expires BE, 3, app, topic).
pub(crate) fn expiry_retained(expires_ms: u64, app: &str, topic: &str) -> Vec<u8> {
    KeyBuf::new()
        .u64(expires_ms)
        .u8(EXPIRY_RETAINED)
        .str(app)
        .str(topic)
        .done()
}

/// Expiry index entry of a kept session whose session ended: (expires BE, 4, app, user, device).
pub(crate) fn expiry_kept(expires_ms: u64, app: &str, user: &str, device: &str) -> Vec<u8> {
    KeyBuf::new()
        .u64(expires_ms)
        .u8(EXPIRY_KEPT)
        .str(app)
        .str(user)
        .str(device)
        .done()
}

/// What an expiry index key points at.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ExpiryItem {
    Message {
        expires_ms: u64,
        app: String,
        user: String,
        seq: u64,
    },
    Idem {
        expires_ms: u64,
        app: String,
        key: String,
    },
    Location {
        expires_ms: u64,
        app: String,
        msg_id: String,
        user: String,
        seq: u64,
    },
    Retained {
        expires_ms: u64,
        app: String,
        topic: String,
    },
    Kept {
        expires_ms: u64,
        app: String,
        user: String,
        device: String,
    },
}

pub(crate) fn parse_expiry(key: &[u8]) -> Option<ExpiryItem> {
    let mut r = KeyReader::new(key);
    let expires_ms = r.u64()?;
    let item = match r.u8()? {
        EXPIRY_MESSAGE => ExpiryItem::Message {
            expires_ms,
            app: r.str()?,
            user: r.str()?,
            seq: r.u64()?,
        },
        EXPIRY_IDEM => ExpiryItem::Idem {
            expires_ms,
            app: r.str()?,
            key: r.str()?,
        },
        EXPIRY_LOCATION => ExpiryItem::Location {
            expires_ms,
            app: r.str()?,
            msg_id: r.str()?,
            user: r.str()?,
            seq: r.u64()?,
        },
        EXPIRY_RETAINED => ExpiryItem::Retained {
            expires_ms,
            app: r.str()?,
            topic: r.str()?,
        },
        EXPIRY_KEPT => ExpiryItem::Kept {
            expires_ms,
            app: r.str()?,
            user: r.str()?,
            device: r.str()?,
        },
        _ => return None,
    };
    r.is_empty().then_some(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_prefix_is_exact() {
        // "b" + "cd" and "bc" + "d" concatenate alike; the length prefix keeps them apart.
        let p = user("a", "b");
        let (lo, hi) = prefix_range(p.clone());
        let inside = mail("a", "b", 7);
        let outside = mail("a", "bc", 1);
        assert!(inside >= lo && inside < hi);
        assert!(!(outside >= lo && outside < hi));
        assert!(device("a", "b", "x").starts_with(&p));
        assert!(!device("a", "bc", "x").starts_with(&p));
    }

    #[test]
    fn mailbox_prefix_is_the_user_key() {
        assert_eq!(mailbox_of(&mail("app", "u1", 42)), user("app", "u1").as_slice());
        assert_eq!(mailbox_of(b"short"), b"short");
        let (_, end) = prefix_range(user("app", "u1"));
        // A scan from a whole key to the mailbox's end stays in it...
        assert!(within_one_mailbox(&mail("app", "u1", 1), &end));
        assert!(within_one_mailbox(&mail("app", "u1", 1), &mail("app", "u1", 9)));
        // ...one that runs into the next mailbox, or starts from a bare mailbox prefix (which
        // `mailbox_of` would cut wrongly), does not.
        assert!(!within_one_mailbox(&mail("app", "u1", 1), &mail("app", "u2", 0)));
        assert!(!within_one_mailbox(&user("app", "u1"), &end));
        assert!(!within_one_mailbox(&[0, 1], &end));
    }

    #[test]
    fn integers_sort_numerically() {
        assert!(mail("a", "u", 2) < mail("a", "u", 10));
        assert!(mail("a", "u", 255) < mail("a", "u", 256));
        assert!(expiry_message(5, "zz", "u", 1) < expiry_idem(6, "a", "k"));
        // At equal times messages come before idempotency keys.
        assert!(expiry_message(5, "zz", "u", 1) < expiry_idem(5, "a", "k"));
    }

    #[test]
    fn strings_sort_by_length_then_bytes() {
        assert!(app("b") < app("aa"));
        assert!(app("a") < app("b"));
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(&[1, 2, 3]), Some(vec![1, 2, 4]));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        let (lo, hi) = prefix_range(vec![0xff]);
        assert!(lo < hi);
    }

    #[test]
    fn parse_round_trips() {
        assert_eq!(
            parse_node_session(&node_session(3, "app", "u", "d")),
            Some((3, "app".into(), "u".into(), "d".into()))
        );
        assert_eq!(
            parse_expiry(&expiry_message(9, "a", "u", 4)),
            Some(ExpiryItem::Message {
                expires_ms: 9,
                app: "a".into(),
                user: "u".into(),
                seq: 4
            })
        );
        assert_eq!(
            parse_expiry(&expiry_idem(9, "a", "k")),
            Some(ExpiryItem::Idem {
                expires_ms: 9,
                app: "a".into(),
                key: "k".into()
            })
        );
        assert_eq!(
            parse_expiry(&expiry_location(9, "a", "m", "u", 4)),
            Some(ExpiryItem::Location {
                expires_ms: 9,
                app: "a".into(),
                msg_id: "m".into(),
                user: "u".into(),
                seq: 4
            })
        );
        assert_eq!(
            parse_expiry(&expiry_retained(9, "a", "t")),
            Some(ExpiryItem::Retained {
                expires_ms: 9,
                app: "a".into(),
                topic: "t".into()
            })
        );
        assert_eq!(
            parse_expiry(&expiry_kept(9, "a", "u", "d")),
            Some(ExpiryItem::Kept {
                expires_ms: 9,
                app: "a".into(),
                user: "u".into(),
                device: "d".into()
            })
        );
        // Truncated or trailing bytes are rejected, not misread.
        let k = expiry_idem(9, "a", "k");
        assert_eq!(parse_expiry(&k[..k.len() - 1]), None);
        let mut long = k.clone();
        long.push(0);
        assert_eq!(parse_expiry(&long), None);
        assert_eq!(parse_node_session(&[1, 2]), None);
    }
}
