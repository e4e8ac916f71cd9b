//! Byte layout of everything the store writes to sled: record addresses, records, meta values.
//!
//! Records are written on every change and read on every range, so they use a small hand-written
//! format (varints, no field names) rather than a general serializer. Version byte first, so the
//! layout can change later without guessing.

use bytes::Bytes;

/// Address of one stored version: the main revision of the write and its position inside a
/// transaction (etcd's sub-revision).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Rev {
    pub main: i64,
    pub sub: u32,
}

impl Rev {
    pub const fn new(main: i64, sub: u32) -> Self {
        Rev { main, sub }
    }
}

/// Prefixes of the key spaces inside one state-machine tree.
pub(crate) const RECORD_PREFIX: u8 = b'r';
pub(crate) const LEASE_PREFIX: u8 = b'l';
pub(crate) const META_PREFIX: u8 = b'm';

pub(crate) fn record_key(rev: Rev) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = RECORD_PREFIX;
    k[1..9].copy_from_slice(&(rev.main as u64).to_be_bytes());
    k[9..13].copy_from_slice(&rev.sub.to_be_bytes());
    k
}

pub(crate) fn parse_record_key(k: &[u8]) -> Option<Rev> {
    if k.len() != 13 || k[0] != RECORD_PREFIX {
        return None;
    }
    let main = u64::from_be_bytes(k[1..9].try_into().ok()?) as i64;
    let sub = u32::from_be_bytes(k[9..13].try_into().ok()?);
    Some(Rev { main, sub })
}

pub(crate) fn lease_key(id: i64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LEASE_PREFIX;
    k[1..9].copy_from_slice(&(id as u64).to_be_bytes());
    k
}

pub(crate) fn parse_lease_key(k: &[u8]) -> Option<i64> {
    if k.len() != 9 || k[0] != LEASE_PREFIX {
        return None;
    }
    Some(u64::from_be_bytes(k[1..9].try_into().ok()?) as i64)
}

pub(crate) fn meta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.push(META_PREFIX);
    k.extend_from_slice(name.as_bytes());
    k
}

/// One stored version of a key (or its deletion).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub key: Bytes,
    pub value: Bytes,
    pub rev: Rev,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub tombstone: bool,
    /// Address of the previous live version of this key, if this write replaced or deleted one.
    pub prev: Option<Rev>,
}

const RECORD_FORMAT: u8 = 1;
const FLAG_TOMBSTONE: u8 = 1;
const FLAG_PREV: u8 = 2;

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.key.len() + self.value.len() + 24);
        out.push(RECORD_FORMAT);
        let mut flags = 0;
        if self.tombstone {
            flags |= FLAG_TOMBSTONE;
        }
        if self.prev.is_some() {
            flags |= FLAG_PREV;
        }
        out.push(flags);
        put_uvarint(&mut out, self.key.len() as u64);
        out.extend_from_slice(&self.key);
        put_uvarint(&mut out, self.create_revision as u64);
        put_uvarint(&mut out, self.version as u64);
        put_uvarint(&mut out, self.lease as u64);
        if let Some(prev) = self.prev {
            put_uvarint(&mut out, prev.main as u64);
            put_uvarint(&mut out, prev.sub as u64);
        }
        out.extend_from_slice(&self.value);
        out
    }

    /// Decodes a record stored at `rev`; `raw` is the whole stored value.
    pub fn decode(rev: Rev, raw: &[u8]) -> Result<Record, String> {
        let mut r = Reader { buf: raw, pos: 0 };
        let format = r.byte()?;
        if format != RECORD_FORMAT {
            return Err(format!("record {rev:?}: unknown record format {format}"));
        }
        let flags = r.byte()?;
        let klen = r.uvarint()? as usize;
        let key = Bytes::copy_from_slice(r.take(klen)?);
        let create_revision = r.uvarint()? as i64;
        let version = r.uvarint()? as i64;
        let lease = r.uvarint()? as i64;
        let prev = if flags & FLAG_PREV != 0 {
            let main = r.uvarint()? as i64;
            let sub = r.uvarint()? as u32;
            Some(Rev { main, sub })
        } else {
            None
        };
        let value = Bytes::copy_from_slice(&raw[r.pos..]);
        Ok(Record {
            key,
            value,
            rev,
            create_revision,
            version,
            lease,
            tombstone: flags & FLAG_TOMBSTONE != 0,
            prev,
        })
    }

    /// Only the key of an encoded record (compaction needs no more).
    pub fn decode_key(raw: &[u8]) -> Result<&[u8], String> {
        let mut r = Reader { buf: raw, pos: 0 };
        let _format = r.byte()?;
        let _flags = r.byte()?;
        let klen = r.uvarint()? as usize;
        r.take(klen)
    }

    pub fn to_key_value(&self) -> crate::KeyValue {
        crate::KeyValue {
            key: self.key.clone(),
            value: self.value.clone(),
            create_revision: if self.tombstone {
                0
            } else {
                self.create_revision
            },
            mod_revision: self.rev.main,
            version: if self.tombstone { 0 } else { self.version },
            lease: if self.tombstone { 0 } else { self.lease },
        }
    }
}

pub(crate) fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.buf.get(self.pos).ok_or("record truncated")?;
        self.pos += 1;
        Ok(b)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("record length overflow")?;
        let s = self.buf.get(self.pos..end).ok_or("record truncated")?;
        self.pos = end;
        Ok(s)
    }
    fn uvarint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
}

pub(crate) fn encode_i64(v: i64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn decode_i64(raw: &[u8]) -> Result<i64, String> {
    Ok(i64::from_be_bytes(
        raw.try_into()
            .map_err(|_| "bad integer length".to_string())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_with_and_without_prev() {
        for (tomb, prev) in [(false, None), (true, Some(Rev::new(7, 2)))] {
            let rec = Record {
                key: Bytes::from_static(b"/registry/pods/default/x"),
                value: Bytes::from(vec![1u8; 300]),
                rev: Rev::new(9, 1),
                create_revision: 3,
                version: 4,
                lease: 1 << 40,
                tombstone: tomb,
                prev,
            };
            let enc = rec.encode();
            assert_eq!(Record::decode(rec.rev, &enc).unwrap(), rec);
            assert_eq!(Record::decode_key(&enc).unwrap(), &rec.key[..]);
        }
    }

    #[test]
    fn truncated_record_is_an_error_not_a_panic() {
        let rec = Record {
            key: Bytes::from_static(b"k"),
            value: Bytes::new(),
            rev: Rev::new(2, 0),
            create_revision: 2,
            version: 1,
            lease: 0,
            tombstone: false,
            prev: Some(Rev::new(1, 0)),
        };
        let enc = rec.encode();
        for cut in 0..enc.len() - 1 {
            // Every strict prefix that cuts into the header must fail cleanly.
            let _ = Record::decode(rec.rev, &enc[..cut]);
        }
        assert!(Record::decode(rec.rev, &[]).is_err());
        assert!(Record::decode(rec.rev, &[9]).is_err());
    }

    #[test]
    fn record_keys_sort_by_revision() {
        let a = record_key(Rev::new(2, 5));
        let b = record_key(Rev::new(3, 0));
        let c = record_key(Rev::new(300, 0));
        assert!(a < b && b < c);
        assert_eq!(parse_record_key(&c), Some(Rev::new(300, 0)));
    }
}
