//! The spool's on-disk format: segment files of CRC-framed records.
//!
//! A segment (`seg-NNNNNNNNNN.log`) is a sequence of records, each
//! `[u32 length][u32 crc32 of the body][body]`, little-endian, where the body is a type byte and
//! its fields. Every fsync is preceded by a `Commit` record in the same write, so a commit
//! record that reads back whole proves that everything before it was once on disk.
//!
//! That is what tells the two kinds of bad record apart. A write that a crash cut short (a torn
//! tail) is followed by no whole commit record: nothing in it was acknowledged, and recovery
//! cuts it off. A bad record *followed* by a whole commit record sits in bytes that were
//! fsynced and acknowledged: that is damage, and recovery refuses to guess
//! ([`Damage::committed_after`]).

use std::path::{Path, PathBuf};

use super::state::MAX_SEQ;
use crate::store::MAX_UPSTREAMS;

/// Bytes before a record's body: length and CRC.
pub const HEADER: usize = 8;

const ACCEPT: u8 = 1;
const ATTEMPT: u8 = 2;
const REPLAY: u8 = 3;
const PURGE: u8 = 4;
const DEDUP: u8 = 5;
const COMMIT: u8 = 6;
const SEQ: u8 = 7;
const STATE: u8 = 8;
const FINISHED: u8 = 9;
/// An accepted event with dedup keys of its own (guard windows, a report's once-key), in one
/// record so that a torn write keeps both or neither.
const ACCEPT_KEYED: u8 = 10;
/// The highest record type this version writes. A whole record of a higher type was written by
/// a newer version: not damage, and not to be repaired away (it may record deliveries done).
const LAST_KIND: u8 = ACCEPT_KEYED;
/// Why reading stops at a record of a newer version.
pub const NEWER: &str = "a record type from a newer actiongate";

/// Longest record body decoded: an event body (at most [`crate::store::MAX_BODY`]) and its fields.
/// Anything longer is damage.
pub const MAX_RECORD: usize = crate::store::MAX_BODY + (1 << 20);

/// How an attempt (or a decision not to attempt) ended, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    Delivered,
    Skipped,
    Retry,
    Dead,
    /// Dead-lettered without an attempt (its upstream left the config).
    DeadUnattempted,
}

/// Where a delivery stands, as a [`Record::State`] snapshot says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    Pending,
    Dead,
    /// Delivered, skipped or purged: nothing left to do.
    Done,
}

/// A delivery's whole state, written when the records it was built from are about to be
/// deleted with their segment. It replaces, rather than adds to, what came before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: u64,
    pub kind: StateKind,
    pub attempts: u32,
    pub due_ms: u64,
    pub first_attempt_ms: Option<u64>,
    pub last_attempt_ms: Option<u64>,
    pub last_status: Option<u16>,
    pub dead_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// One decoded record. `Accept` gives the body's position instead of a copy of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Accept {
        seq: u64,
        accepted_ms: u64,
        dedup_expires_ms: u64,
        action: String,
        event_id: String,
        upstreams: Vec<String>,
        /// Dedup keys that stand or fall with the event (see [`super::guard`]), with when each
        /// expires.
        keys: Vec<(String, u64)>,
        /// Offset of the body from the start of the record, and its length.
        body_at: usize,
        body_len: usize,
    },
    Attempt {
        id: u64,
        kind: AttemptKind,
        at_ms: u64,
        due_ms: u64,
        status: Option<u16>,
        error: String,
    },
    Replay {
        id: u64,
        at_ms: u64,
    },
    Purge {
        id: u64,
    },
    /// A dedup key carried forward from a segment being deleted.
    Dedup {
        key: String,
        expires_ms: u64,
    },
    /// Everything before it was fsynced together with it.
    Commit,
    /// The first record of a segment: sequence numbers go on from here, even when every
    /// segment that held the newest accepted events has been deleted.
    Seq {
        next: u64,
    },
    /// A delivery's state carried forward from a segment being deleted.
    State(Snapshot),
    /// Events whose every delivery is done, carried forward from a segment being deleted
    /// while their accept records live on in an older one: a bit per event instead of a
    /// snapshot per delivery. Sorted, and stored as a bitmap from the first.
    Finished {
        seqs: Vec<u64>,
    },
}

pub fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("seg-{number:010}.log"))
}

/// The segment number of a file name, if it is a segment.
pub fn segment_number(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// Appends records to a batch buffer.
pub struct Encoder<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
}

impl<'b> Encoder<'b> {
    fn begin(buf: &'b mut Vec<u8>, kind: u8) -> Encoder<'b> {
        let start = buf.len();
        buf.extend_from_slice(&[0; HEADER]);
        buf.push(kind);
        Encoder { buf, start }
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Fields are bounded well below 4 GiB (bodies by limits.max_body).
        self.buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(v);
        self
    }

    fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// Fills in length and CRC; returns the record's offset in the buffer.
    fn finish(self) -> usize {
        let body = &self.buf[self.start + HEADER..];
        let len = (body.len() as u32).to_le_bytes();
        let crc = crc32fast::hash(body).to_le_bytes();
        self.buf[self.start..self.start + 4].copy_from_slice(&len);
        self.buf[self.start + 4..self.start + 8].copy_from_slice(&crc);
        self.start
    }
}

/// Encodes an accepted event; returns the offset of its body within `buf`.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn encode_accept(
    buf: &mut Vec<u8>,
    seq: u64,
    accepted_ms: u64,
    dedup_expires_ms: u64,
    action: &str,
    event_id: &str,
    upstreams: &[impl AsRef<str>],
    body: &[u8],
) -> usize {
    encode_accept_keyed(
        buf,
        seq,
        accepted_ms,
        dedup_expires_ms,
        action,
        event_id,
        upstreams,
        &[],
        body,
    )
}

/// [`encode_accept`] with dedup keys of the event's own; without any it is a plain `Accept`
/// record, which every version reads.
#[allow(clippy::too_many_arguments)]
pub fn encode_accept_keyed(
    buf: &mut Vec<u8>,
    seq: u64,
    accepted_ms: u64,
    dedup_expires_ms: u64,
    action: &str,
    event_id: &str,
    upstreams: &[impl AsRef<str>],
    keys: &[(String, u64)],
    body: &[u8],
) -> usize {
    let kind = if keys.is_empty() {
        ACCEPT
    } else {
        ACCEPT_KEYED
    };
    let mut e = Encoder::begin(buf, kind);
    e.u64(seq)
        .u64(accepted_ms)
        .u64(dedup_expires_ms)
        .str(action)
        .str(event_id);
    e.u16(upstreams.len() as u16);
    for upstream in upstreams {
        e.str(upstream.as_ref());
    }
    if !keys.is_empty() {
        e.u16(keys.len() as u16);
        for (key, expires_ms) in keys {
            e.str(key).u64(*expires_ms);
        }
    }
    e.bytes(body);
    let start = e.finish();
    // The body is the record's last field.
    start + HEADER + (buf.len() - start - HEADER - body.len())
}

pub fn encode_attempt(
    buf: &mut Vec<u8>,
    id: u64,
    kind: AttemptKind,
    at_ms: u64,
    due_ms: u64,
    status: Option<u16>,
    error: &str,
) {
    let kind = match kind {
        AttemptKind::Delivered => 0u16,
        AttemptKind::Skipped => 1,
        AttemptKind::Retry => 2,
        AttemptKind::Dead => 3,
        AttemptKind::DeadUnattempted => 4,
    };
    let mut e = Encoder::begin(buf, ATTEMPT);
    e.u64(id)
        .u16(kind)
        .u64(at_ms)
        .u64(due_ms)
        .u16(status.unwrap_or(0))
        .str(error);
    e.finish();
}

pub fn encode_replay(buf: &mut Vec<u8>, id: u64, at_ms: u64) {
    let mut e = Encoder::begin(buf, REPLAY);
    e.u64(id).u64(at_ms);
    e.finish();
}

pub fn encode_purge(buf: &mut Vec<u8>, id: u64) {
    let mut e = Encoder::begin(buf, PURGE);
    e.u64(id);
    e.finish();
}

pub fn encode_dedup(buf: &mut Vec<u8>, key: &str, expires_ms: u64) {
    let mut e = Encoder::begin(buf, DEDUP);
    e.str(key).u64(expires_ms);
    e.finish();
}

pub fn encode_commit(buf: &mut Vec<u8>) {
    Encoder::begin(buf, COMMIT).finish();
}

pub fn encode_seq(buf: &mut Vec<u8>, next: u64) {
    let mut e = Encoder::begin(buf, SEQ);
    e.u64(next);
    e.finish();
}

pub fn encode_state(buf: &mut Vec<u8>, s: &Snapshot) {
    let kind = match s.kind {
        StateKind::Pending => 0u16,
        StateKind::Dead => 1,
        StateKind::Done => 2,
    };
    let mut e = Encoder::begin(buf, STATE);
    e.u64(s.id)
        .u16(kind)
        .u64(u64::from(s.attempts))
        .u64(s.due_ms)
        .u64(s.first_attempt_ms.map_or(0, |v| v + 1))
        .u64(s.last_attempt_ms.map_or(0, |v| v + 1))
        .u16(s.last_status.unwrap_or(0))
        .u64(s.dead_ms.map_or(0, |v| v + 1))
        .u16(u16::from(s.last_error.is_some()))
        .str(s.last_error.as_deref().unwrap_or(""));
    e.finish();
}

/// Encodes any record but `Accept`, which is encoded with its body by [`encode_accept`].
pub fn encode_record(buf: &mut Vec<u8>, record: &Record) {
    match record {
        Record::Accept { .. } => debug_assert!(false, "accept records carry a body"),
        Record::Attempt {
            id,
            kind,
            at_ms,
            due_ms,
            status,
            error,
        } => encode_attempt(buf, *id, *kind, *at_ms, *due_ms, *status, error),
        Record::Replay { id, at_ms } => encode_replay(buf, *id, *at_ms),
        Record::Purge { id } => encode_purge(buf, *id),
        Record::Dedup { key, expires_ms } => encode_dedup(buf, key, *expires_ms),
        Record::Commit => encode_commit(buf),
        Record::Seq { next } => encode_seq(buf, *next),
        Record::State(snapshot) => encode_state(buf, snapshot),
        Record::Finished { seqs } => encode_finished(buf, seqs),
    }
}

/// `seqs` sorted; encoded as the first and a bitmap of the range from it.
pub fn encode_finished(buf: &mut Vec<u8>, seqs: &[u64]) {
    let first = seqs.first().copied().unwrap_or(0);
    let span = seqs.last().map_or(0, |last| last - first + 1);
    let mut bits = vec![0u8; span.div_ceil(8) as usize];
    for seq in seqs {
        let i = (seq - first) as usize;
        bits[i / 8] |= 1 << (i % 8);
    }
    let mut e = Encoder::begin(buf, FINISHED);
    e.u64(first).bytes(&bits);
    e.finish();
}

/// Why reading a segment stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Offset of the first bad record: every record before it is whole.
    pub at: usize,
    pub why: String,
    /// A whole commit record follows the bad one: the bad bytes had been fsynced (and what
    /// they held acknowledged), so this is damage to stored data, not a write cut short.
    pub committed_after: bool,
}

/// The record starting at `at`, and its length with the header, or why there is none.
fn record_at(data: &[u8], at: usize) -> Result<(Record, usize), &'static str> {
    let Some(header) = data.get(at..at + HEADER) else {
        return Err("partial record header");
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_RECORD {
        return Err("impossible record length");
    }
    let Some(body) = data.get(at + HEADER..at + HEADER + len) else {
        return Err("partial record");
    };
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch");
    }
    if body[0] > LAST_KIND {
        return Err(NEWER);
    }
    let record = decode(body).ok_or("undecodable record")?;
    Ok((record, HEADER + len))
}

/// Decodes every record of a segment's bytes, calling `each(offset, record)`. Stops at the
/// first bad record and says where it is and whether committed data follows it.
pub fn read_segment(data: &[u8], mut each: impl FnMut(usize, Record)) -> Result<(), Damage> {
    let mut at = 0;
    while at < data.len() {
        match record_at(data, at) {
            Ok((record, len)) => {
                each(at, record);
                at += len;
            }
            Err(why) => {
                return Err(Damage {
                    at,
                    why: format!("{why} at offset {at}"),
                    committed_after: next_commit(data, at + 1).is_some(),
                })
            }
        }
    }
    Ok(())
}

/// Where the next whole commit record starts, at or after `from`. A commit record is nine
/// fixed bytes (`01 00 00 00`, its CRC, `06`), which no stored string can hold (a 0x00 byte
/// is never followed by the CRC's 0xb8 in UTF-8) and no JSON body can (no raw 0x00): unlike
/// other records, it cannot be forged inside an event_id. Binary fields (numbers, a
/// `Finished` bitmap) could hold the nine bytes by chance, about once in 2^72 positions.
fn next_commit(data: &[u8], from: usize) -> Option<usize> {
    let mut pattern = [0u8; HEADER + 1];
    pattern[..4].copy_from_slice(&1u32.to_le_bytes());
    pattern[4..8].copy_from_slice(&crc32fast::hash(&[COMMIT]).to_le_bytes());
    pattern[8] = COMMIT;
    let rest = data.get(from..)?;
    rest.windows(pattern.len())
        .position(|w| w == pattern)
        .map(|p| from + p)
}

/// Where a repair resumes after damage at `from`: the first offset from which whole records
/// follow one another exactly up to the next commit record (or the end, if none follows).
/// Requiring the chain to meet a commit keeps a record forged inside an event_id (which
/// parses alone, then runs into the rest of its accept record) from being taken for a real
/// one. Failing that, right after the commit: the rest of the damaged batch is set aside.
pub fn next_record(data: &[u8], from: usize) -> Option<usize> {
    let commit = next_commit(data, from);
    let target = commit.unwrap_or(data.len());
    let reaches = |mut at: usize| {
        while at < target {
            match record_at(data, at) {
                Ok((_, len)) => at += len,
                Err(_) => return false,
            }
        }
        at == target
    };
    (from..=target).find(|&at| reaches(at))
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.data.get(self.at..self.at + n)?;
        self.at += n;
        Some(slice)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Some(u64::from_le_bytes(array))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

fn decode(body: &[u8]) -> Option<Record> {
    let mut r = Reader { data: body, at: 1 };
    let record = Some(match *body.first()? {
        kind @ (ACCEPT | ACCEPT_KEYED) => {
            let seq = r.u64().filter(|seq| *seq < MAX_SEQ)?;
            let accepted_ms = r.u64()?;
            let dedup_expires_ms = r.u64()?;
            let action = r.string()?;
            let event_id = r.string()?;
            let n = r.u16().filter(|n| usize::from(*n) <= MAX_UPSTREAMS)?;
            let upstreams = (0..n).map(|_| r.string()).collect::<Option<Vec<_>>>()?;
            let keys = if kind == ACCEPT_KEYED {
                let n = r.u16().filter(|n| *n > 0)?;
                (0..n)
                    .map(|_| Some((r.string()?, r.u64()?)))
                    .collect::<Option<Vec<_>>>()?
            } else {
                Vec::new()
            };
            let body_len = r.u32()? as usize;
            let body_at = HEADER + r.at;
            r.take(body_len)?;
            Record::Accept {
                seq,
                accepted_ms,
                dedup_expires_ms,
                action,
                event_id,
                upstreams,
                keys,
                body_at,
                body_len,
            }
        }
        ATTEMPT => {
            let id = r.u64()?;
            let kind = match r.u16()? {
                0 => AttemptKind::Delivered,
                1 => AttemptKind::Skipped,
                2 => AttemptKind::Retry,
                3 => AttemptKind::Dead,
                4 => AttemptKind::DeadUnattempted,
                _ => return None,
            };
            let at_ms = r.u64()?;
            let due_ms = r.u64()?;
            let status = Some(r.u16()?).filter(|s| *s != 0);
            let error = r.string()?;
            Record::Attempt {
                id,
                kind,
                at_ms,
                due_ms,
                status,
                error,
            }
        }
        REPLAY => Record::Replay {
            id: r.u64()?,
            at_ms: r.u64()?,
        },
        PURGE => Record::Purge { id: r.u64()? },
        DEDUP => Record::Dedup {
            key: r.string()?,
            expires_ms: r.u64()?,
        },
        COMMIT => Record::Commit,
        FINISHED => {
            let first = r.u64()?;
            let bits = r.bytes()?;
            // A damaged `first` near u64::MAX would overflow below; no real sequence is there.
            first
                .checked_add(bits.len() as u64 * 8)
                .filter(|end| *end <= MAX_SEQ)?;
            let seqs = (0..bits.len() * 8)
                .filter(|i| bits[i / 8] & (1 << (i % 8)) != 0)
                .map(|i| first + i as u64)
                .collect();
            Record::Finished { seqs }
        }
        SEQ => Record::Seq {
            next: r.u64().filter(|next| *next <= MAX_SEQ)?,
        },
        STATE => {
            let id = r.u64()?;
            let kind = match r.u16()? {
                0 => StateKind::Pending,
                1 => StateKind::Dead,
                2 => StateKind::Done,
                _ => return None,
            };
            let attempts = u32::try_from(r.u64()?).ok()?;
            let due_ms = r.u64()?;
            let optional = |v: u64| v.checked_sub(1);
            let first_attempt_ms = optional(r.u64()?);
            let last_attempt_ms = optional(r.u64()?);
            let last_status = Some(r.u16()?).filter(|s| *s != 0);
            let dead_ms = optional(r.u64()?);
            let has_error = r.u16()? == 1;
            let error = r.string()?;
            Record::State(Snapshot {
                id,
                kind,
                attempts,
                due_ms,
                first_attempt_ms,
                last_attempt_ms,
                last_status,
                dead_ms,
                last_error: has_error.then_some(error),
            })
        }
        _ => return None,
    })?;
    // Trailing bytes mean the record is not what its type says.
    (r.at == body.len()).then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(data: &[u8]) -> (Vec<(usize, Record)>, Result<(), Damage>) {
        let mut out = Vec::new();
        let result = read_segment(data, |at, r| out.push((at, r)));
        (out, result)
    }

    #[test]
    fn records_round_trip_and_bodies_are_located() {
        let mut buf = Vec::new();
        let body_at = encode_accept(
            &mut buf,
            7,
            100,
            200,
            "act",
            "e\u{1f}1",
            &["a", "b"],
            b"{\"x\":1}",
        );
        assert_eq!(&buf[body_at..body_at + 7], b"{\"x\":1}");
        encode_attempt(
            &mut buf,
            7 << 8,
            AttemptKind::Retry,
            5,
            9,
            Some(503),
            "HTTP 503",
        );
        encode_replay(&mut buf, 3, 11);
        encode_purge(&mut buf, 4);
        encode_dedup(&mut buf, "act\u{1f}e", 99);
        let (got, result) = records(&buf);
        assert_eq!(result, Ok(()));
        assert_eq!(got.len(), 5);
        let (
            at,
            Record::Accept {
                body_at: rel,
                body_len,
                upstreams,
                ..
            },
        ) = &got[0]
        else {
            panic!()
        };
        assert_eq!(at + rel, body_at);
        assert_eq!(*body_len, 7);
        assert_eq!(upstreams, &["a", "b"]);
        assert_eq!(
            got[1].1,
            Record::Attempt {
                id: 7 << 8,
                kind: AttemptKind::Retry,
                at_ms: 5,
                due_ms: 9,
                status: Some(503),
                error: "HTTP 503".into()
            }
        );
        assert_eq!(got[2].1, Record::Replay { id: 3, at_ms: 11 });
        assert_eq!(got[3].1, Record::Purge { id: 4 });
        assert_eq!(
            got[4].1,
            Record::Dedup {
                key: "act\u{1f}e".into(),
                expires_ms: 99
            }
        );
    }

    /// Found by the fuzzer (fuzz_spool): a damaged `Finished` record whose first sequence
    /// is near u64::MAX overflowed while listing its sequences.
    #[test]
    fn a_finished_record_past_the_last_sequence_is_damage_not_a_panic() {
        let mut body = vec![FINISHED];
        body.extend_from_slice(&(u64::MAX - 3).to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.push(0xff);
        let mut buf = (body.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        buf.extend_from_slice(&body);
        let (got, result) = records(&buf);
        assert!(got.is_empty());
        assert!(result.unwrap_err().why.starts_with("undecodable record"));
    }

    #[test]
    fn an_accept_with_keys_of_its_own_is_one_record() {
        let keys = vec![
            ("\u{1f}once\u{1f}a\u{1f}i".to_string(), 7),
            ("k2".to_string(), 9),
        ];
        let mut buf = Vec::new();
        let body_at = encode_accept_keyed(&mut buf, 3, 1, 2, "a", "e", &["u"], &keys, b"{}");
        let (got, result) = records(&buf);
        assert_eq!(result, Ok(()));
        let [(
            0,
            Record::Accept {
                keys: read,
                body_at: at,
                body_len,
                ..
            },
        )] = got.as_slice()
        else {
            panic!("{got:?}")
        };
        assert_eq!((read, *at, *body_len), (&keys, body_at, 2));
        // Torn anywhere inside, none of it is read: neither the event nor its keys.
        for cut in 1..buf.len() {
            let (got, result) = records(&buf[..cut]);
            assert!(got.is_empty() && result.is_err(), "cut at {cut}");
        }
    }

    /// Found by the fuzzer in CI: an `Accept` whose sequence number is u64::MAX overflowed
    /// replay's `seq + 1`. Sequence numbers past [`MAX_SEQ`] (and `Seq` or `Finished` records
    /// reaching past it, and more upstreams than a delivery id can name) are damage.
    #[test]
    fn sequence_numbers_past_the_last_one_are_damage_not_a_panic() {
        let framed = |body: Vec<u8>| {
            let mut buf = (body.len() as u32).to_le_bytes().to_vec();
            buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
            buf.extend_from_slice(&body);
            buf
        };
        let mut accept = Vec::new();
        encode_accept(&mut accept, MAX_SEQ - 1, 0, 0, "a", "e", &["u"], b"{}");
        assert_eq!(
            records(&accept).0.len(),
            1,
            "the last sequence number is fine"
        );
        let mut accept = Vec::new();
        encode_accept(&mut accept, u64::MAX, 0, 0, "a", "e", &["u"], b"{}");
        let mut seq = vec![SEQ];
        seq.extend_from_slice(&(MAX_SEQ + 1).to_le_bytes());
        let mut finished = vec![FINISHED];
        finished.extend_from_slice(&(MAX_SEQ - 4).to_le_bytes());
        finished.extend_from_slice(&1u32.to_le_bytes());
        finished.push(0x01);
        let names: Vec<String> = (0..=MAX_UPSTREAMS).map(|i| format!("u{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut crowded = Vec::new();
        encode_accept(&mut crowded, 1, 0, 0, "a", "e", &names, b"{}");
        for (what, buf) in [
            ("accept", accept),
            ("seq", framed(seq)),
            ("finished", framed(finished)),
            ("upstreams", crowded),
        ] {
            let (got, result) = records(&buf);
            assert!(got.is_empty(), "{what}");
            assert!(
                result.unwrap_err().why.starts_with("undecodable record"),
                "{what}"
            );
        }
    }

    #[test]
    fn a_torn_tail_keeps_every_whole_record_before_it() {
        let mut buf = Vec::new();
        encode_purge(&mut buf, 1);
        let whole = buf.len();
        encode_accept(&mut buf, 2, 0, 0, "a", "e", &["u"], &[7u8; 100]);
        for cut in whole + 1..buf.len() {
            let (got, result) = records(&buf[..cut]);
            assert_eq!(got.len(), 1, "cut at {cut}");
            let damage = result.unwrap_err();
            assert_eq!(damage.at, whole);
            assert!(!damage.committed_after, "cut at {cut}");
        }
    }

    #[test]
    fn new_record_kinds_round_trip() {
        let snapshot = Snapshot {
            id: 9 << 8 | 1,
            kind: StateKind::Dead,
            attempts: 3,
            due_ms: 10,
            first_attempt_ms: Some(0),
            last_attempt_ms: Some(12),
            last_status: Some(502),
            dead_ms: Some(13),
            last_error: Some(String::new()),
        };
        let done = Snapshot {
            kind: StateKind::Done,
            first_attempt_ms: None,
            last_error: None,
            ..snapshot.clone()
        };
        let mut buf = Vec::new();
        encode_seq(&mut buf, 42);
        encode_state(&mut buf, &snapshot);
        encode_state(&mut buf, &done);
        encode_finished(&mut buf, &[70, 71, 79, 200]);
        encode_commit(&mut buf);
        let (got, result) = records(&buf);
        assert_eq!(result, Ok(()));
        let got: Vec<Record> = got.into_iter().map(|(_, r)| r).collect();
        assert_eq!(
            got,
            vec![
                Record::Seq { next: 42 },
                Record::State(snapshot),
                Record::State(done),
                Record::Finished {
                    seqs: vec![70, 71, 79, 200]
                },
                Record::Commit
            ]
        );
    }

    #[test]
    fn a_bad_record_before_a_commit_is_damage_and_after_the_last_commit_a_torn_tail() {
        let mut buf = Vec::new();
        encode_purge(&mut buf, 1);
        let second = buf.len();
        encode_accept(&mut buf, 2, 0, 0, "a", "e", &["u"], &[7u8; 100]);
        encode_commit(&mut buf);
        let committed = buf.len();
        encode_purge(&mut buf, 3);
        // A flipped byte anywhere in the committed accept record (header or body).
        for at in second..committed - HEADER - 1 {
            let mut damaged = buf.clone();
            damaged[at] ^= 0x40;
            let (got, result) = records(&damaged);
            let damage = result.unwrap_err();
            assert_eq!((got.len(), damage.at), (1, second), "flip at {at}");
            assert!(damage.committed_after, "flip at {at}");
        }
        // In the record after the last commit: not acknowledged, a torn tail.
        for at in committed..buf.len() {
            let mut damaged = buf.clone();
            damaged[at] ^= 0x40;
            let damage = records(&damaged).1.unwrap_err();
            assert_eq!(damage.at, committed, "flip at {at}");
            assert!(!damage.committed_after, "flip at {at}");
        }
        // Repair finds where whole records resume after the damage.
        let mut damaged = buf.clone();
        damaged[second + HEADER + 3] ^= 0x40;
        let resume = next_record(&damaged, second + 1).unwrap();
        assert_eq!(resume, committed - HEADER - 1);
    }

    #[test]
    fn a_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode_purge(&mut buf, 1);
        encode_replay(&mut buf, 2, 3);
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let (got, result) = records(&buf);
        assert_eq!(got.len(), 1);
        assert!(result.unwrap_err().why.starts_with("checksum mismatch"));
    }
}
