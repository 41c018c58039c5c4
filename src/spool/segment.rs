//! The spool's on-disk format: segment files of CRC-framed records.
//!
//! A segment (`seg-NNNNNNNNNN.log`) is a sequence of records, each
//! `[u32 length][u32 crc32 of the body][body]`, little-endian, where the body is a type byte and
//! its fields. A write that a crash cut short fails its length or CRC check: recovery keeps
//! every record before it and truncates the rest, which is safe because nothing in a batch is
//! acknowledged before the whole batch is fsynced.

use std::path::{Path, PathBuf};

/// Bytes before a record's body: length and CRC.
pub const HEADER: usize = 8;

const ACCEPT: u8 = 1;
const ATTEMPT: u8 = 2;
const REPLAY: u8 = 3;
const PURGE: u8 = 4;
const DEDUP: u8 = 5;

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
    let mut e = Encoder::begin(buf, ACCEPT);
    e.u64(seq)
        .u64(accepted_ms)
        .u64(dedup_expires_ms)
        .str(action)
        .str(event_id);
    e.u16(upstreams.len() as u16);
    for upstream in upstreams {
        e.str(upstream.as_ref());
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

/// Why reading a segment stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Torn {
    /// Bytes of whole, valid records before the damage.
    pub valid_len: usize,
    pub why: String,
}

/// Decodes every record of a segment's bytes, calling `each(offset, record)`. Returns where the
/// valid records end if the segment ends in a damaged or partial record.
pub fn read_segment(data: &[u8], mut each: impl FnMut(usize, Record)) -> Result<(), Torn> {
    let mut at = 0;
    while at < data.len() {
        let torn = |why: &str| Torn {
            valid_len: at,
            why: format!("{why} at offset {at}"),
        };
        let Some(header) = data.get(at..at + HEADER) else {
            return Err(torn("partial record header"));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = data.get(at + HEADER..at + HEADER + len) else {
            return Err(torn("partial record"));
        };
        if len == 0 || crc32fast::hash(body) != crc {
            return Err(torn("checksum mismatch"));
        }
        let record = decode(body).ok_or_else(|| torn("undecodable record"))?;
        each(at, record);
        at += HEADER + len;
    }
    Ok(())
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
    Some(match *body.first()? {
        ACCEPT => {
            let seq = r.u64()?;
            let accepted_ms = r.u64()?;
            let dedup_expires_ms = r.u64()?;
            let action = r.string()?;
            let event_id = r.string()?;
            let n = r.u16()?;
            let upstreams = (0..n).map(|_| r.string()).collect::<Option<Vec<_>>>()?;
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
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(data: &[u8]) -> (Vec<(usize, Record)>, Result<(), Torn>) {
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

    #[test]
    fn a_torn_tail_keeps_every_whole_record_before_it() {
        let mut buf = Vec::new();
        encode_purge(&mut buf, 1);
        let whole = buf.len();
        encode_accept(&mut buf, 2, 0, 0, "a", "e", &["u"], &[7u8; 100]);
        for cut in whole + 1..buf.len() {
            let (got, result) = records(&buf[..cut]);
            assert_eq!(got.len(), 1, "cut at {cut}");
            assert_eq!(result.unwrap_err().valid_len, whole);
        }
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
