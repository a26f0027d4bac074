//! The envelope's binary form, for the storage log: compact, and decoded
//! without trusting its input (a damaged record is an error, never a panic or
//! a huge allocation). Its layout is versioned with the log's format (see
//! `store`'s module documentation); changing it means a new format version.
//!
//! Integers are LEB128 varints unless said otherwise; a string or a byte
//! string is a varint length and the bytes.
//!
//! ```text
//! envelope   = id:16 flags:u8 priority:u8 delivery_count timestamp_ms
//!              [routing_key:str] [exchange:str] [properties] payload:bytes
//! flags      = 1 redelivered | 2 persistent | 4 routing key | 8 exchange
//!              | 16 properties
//! properties = pflags:u8 [headers] [content_type:str] [correlation_id:str]
//!              [reply_to:str] [expiration: secs nanos] [deaths] [first_death]
//! pflags     = 1 headers | 2 content type | 4 correlation id | 8 reply-to
//!              | 16 expiration | 32 deaths | 64 first death
//! headers    = count (name:str value)*
//! value      = 0 str | 1 int:zigzag | 2 bool:u8 | 3 bytes | 4 float:8 LE | 5 void
//! deaths     = count death*
//! death      = queue:str reason:u8 count time_ms exchange:str keys:count str*
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use uuid::Uuid;

use super::{Death, DeathReason, Envelope, HeaderValue, Headers, MessageId, Properties};

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    /// The input ended in the middle of a value.
    #[error("truncated")]
    Truncated,
    /// A value is not valid: an unknown tag, bad UTF-8, an oversized varint.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Appends values to a buffer.
pub(crate) struct WireWriter<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> WireWriter<'a> {
    pub(crate) fn new(buf: &'a mut Vec<u8>) -> Self {
        WireWriter { buf }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
}

/// Reads values from a byte buffer; byte strings are slices of it (no copy),
/// or copies of their own when the reader is [`detached`](Self::detached).
pub(crate) struct WireReader<'a> {
    data: &'a Bytes,
    pos: usize,
    copy: bool,
}

impl<'a> WireReader<'a> {
    #[cfg(test)]
    pub(crate) fn new(data: &'a Bytes) -> Self {
        WireReader {
            data,
            pos: 0,
            copy: false,
        }
    }

    /// A reader whose values own their bytes: nothing read keeps `data` (a
    /// whole file, say) alive.
    pub(crate) fn detached(data: &'a Bytes) -> Self {
        WireReader {
            data,
            pos: 0,
            copy: true,
        }
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        let b = *self.data.get(self.pos).ok_or(WireError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(WireError::Invalid("varint"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::Invalid("varint"))
    }

    /// A varint that must fit a `u32`.
    pub(crate) fn varint_u32(&mut self) -> Result<u32, WireError> {
        u32::try_from(self.varint()?).map_err(|_| WireError::Invalid("u32"))
    }

    /// A count of items that take at least `min_size` bytes each: bounded by
    /// what is left, so that a damaged count cannot ask for a huge allocation.
    pub(crate) fn count(&mut self, min_size: usize) -> Result<usize, WireError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| WireError::Invalid("count"))?;
        if n.saturating_mul(min_size.max(1)) > self.remaining() {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }

    pub(crate) fn raw(&mut self, n: usize) -> Result<Bytes, WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        if end > self.data.len() {
            return Err(WireError::Truncated);
        }
        let out = if self.copy {
            Bytes::copy_from_slice(&self.data[self.pos..end])
        } else {
            self.data.slice(self.pos..end)
        };
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn bytes(&mut self) -> Result<Bytes, WireError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| WireError::Truncated)?;
        self.raw(n)
    }

    pub(crate) fn byte_string(&mut self) -> Result<ByteString, WireError> {
        ByteString::try_from(self.bytes()?).map_err(|_| WireError::Invalid("utf-8"))
    }

    fn arc_str(&mut self) -> Result<Arc<str>, WireError> {
        let b = self.bytes()?;
        std::str::from_utf8(&b)
            .map(Arc::from)
            .map_err(|_| WireError::Invalid("utf-8"))
    }
}

const REDELIVERED: u8 = 1;
const PERSISTENT: u8 = 2;
const ROUTING_KEY: u8 = 4;
const EXCHANGE: u8 = 8;
const PROPERTIES: u8 = 16;

const P_HEADERS: u8 = 1;
const P_CONTENT_TYPE: u8 = 2;
const P_CORRELATION_ID: u8 = 4;
const P_REPLY_TO: u8 = 8;
const P_EXPIRATION: u8 = 16;
const P_DEATHS: u8 = 32;
const P_FIRST_DEATH: u8 = 64;

impl Envelope {
    /// Appends the envelope's binary form.
    pub(crate) fn write_wire(&self, w: &mut WireWriter<'_>) {
        w.raw(self.id.0.as_bytes());
        let mut flags = 0;
        if self.redelivered {
            flags |= REDELIVERED;
        }
        if self.persistent {
            flags |= PERSISTENT;
        }
        if self.routing_key.is_some() {
            flags |= ROUTING_KEY;
        }
        if self.exchange.is_some() {
            flags |= EXCHANGE;
        }
        if self.properties.is_some() {
            flags |= PROPERTIES;
        }
        w.u8(flags);
        w.u8(self.priority);
        w.varint(u64::from(self.delivery_count));
        w.varint(self.timestamp_ms);
        if let Some(key) = &self.routing_key {
            w.str(key);
        }
        if let Some(exchange) = &self.exchange {
            w.str(exchange);
        }
        if let Some(p) = &self.properties {
            write_properties(w, p);
        }
        w.bytes(&self.payload);
    }

    /// Reads an envelope written by [`write_wire`](Self::write_wire).
    pub(crate) fn read_wire(r: &mut WireReader<'_>) -> Result<Envelope, WireError> {
        let id = r.raw(16)?;
        let id = Uuid::from_slice(&id).map_err(|_| WireError::Invalid("id"))?;
        let flags = r.u8()?;
        if flags & !(REDELIVERED | PERSISTENT | ROUTING_KEY | EXCHANGE | PROPERTIES) != 0 {
            return Err(WireError::Invalid("envelope flags"));
        }
        let priority = r.u8()?;
        let delivery_count = r.varint_u32()?;
        let timestamp_ms = r.varint()?;
        let routing_key = if flags & ROUTING_KEY != 0 {
            Some(r.arc_str()?)
        } else {
            None
        };
        let exchange = if flags & EXCHANGE != 0 {
            Some(r.arc_str()?)
        } else {
            None
        };
        let properties = if flags & PROPERTIES != 0 {
            Some(Arc::new(read_properties(r)?))
        } else {
            None
        };
        let payload = r.bytes()?;
        Ok(Envelope {
            id: MessageId(id),
            routing_key,
            payload,
            timestamp_ms,
            priority,
            delivery_count,
            redelivered: flags & REDELIVERED != 0,
            persistent: flags & PERSISTENT != 0,
            exchange,
            properties,
        })
    }
}

fn write_properties(w: &mut WireWriter<'_>, p: &Properties) {
    let mut flags = 0;
    if !p.headers.is_empty() {
        flags |= P_HEADERS;
    }
    if p.content_type.is_some() {
        flags |= P_CONTENT_TYPE;
    }
    if p.correlation_id.is_some() {
        flags |= P_CORRELATION_ID;
    }
    if p.reply_to.is_some() {
        flags |= P_REPLY_TO;
    }
    if p.expiration.is_some() {
        flags |= P_EXPIRATION;
    }
    if !p.deaths.is_empty() {
        flags |= P_DEATHS;
    }
    if p.first_death.is_some() {
        flags |= P_FIRST_DEATH;
    }
    w.u8(flags);
    if !p.headers.is_empty() {
        w.varint(p.headers.len() as u64);
        for (name, value) in &p.headers {
            w.str(name);
            write_value(w, value);
        }
    }
    for s in [&p.content_type, &p.correlation_id, &p.reply_to]
        .into_iter()
        .flatten()
    {
        w.str(s);
    }
    if let Some(d) = p.expiration {
        w.varint(d.as_secs());
        w.varint(u64::from(d.subsec_nanos()));
    }
    if !p.deaths.is_empty() {
        w.varint(p.deaths.len() as u64);
        for death in &p.deaths {
            write_death(w, death);
        }
    }
    if let Some(death) = &p.first_death {
        write_death(w, death);
    }
}

fn read_properties(r: &mut WireReader<'_>) -> Result<Properties, WireError> {
    let flags = r.u8()?;
    if flags & 0x80 != 0 {
        return Err(WireError::Invalid("property flags"));
    }
    let mut p = Properties::default();
    if flags & P_HEADERS != 0 {
        let n = r.count(2)?;
        let mut headers = Headers::new();
        for _ in 0..n {
            let name = r.byte_string()?;
            let value = read_value(r)?;
            headers.insert(name, value);
        }
        p.headers = headers;
    }
    if flags & P_CONTENT_TYPE != 0 {
        p.content_type = Some(r.byte_string()?);
    }
    if flags & P_CORRELATION_ID != 0 {
        p.correlation_id = Some(r.byte_string()?);
    }
    if flags & P_REPLY_TO != 0 {
        p.reply_to = Some(r.byte_string()?);
    }
    if flags & P_EXPIRATION != 0 {
        let secs = r.varint()?;
        let nanos = r.varint_u32()?;
        if nanos >= 1_000_000_000 {
            return Err(WireError::Invalid("expiration"));
        }
        p.expiration = Some(Duration::new(secs, nanos));
    }
    if flags & P_DEATHS != 0 {
        let n = r.count(6)?;
        p.deaths = (0..n).map(|_| read_death(r)).collect::<Result<_, _>>()?;
    }
    if flags & P_FIRST_DEATH != 0 {
        p.first_death = Some(read_death(r)?);
    }
    Ok(p)
}

fn write_value(w: &mut WireWriter<'_>, value: &HeaderValue) {
    match value {
        HeaderValue::Str(s) => {
            w.u8(0);
            w.str(s);
        }
        HeaderValue::Int(i) => {
            w.u8(1);
            // Zigzag, so that small negative numbers stay short.
            w.varint(((i << 1) ^ (i >> 63)) as u64);
        }
        HeaderValue::Bool(b) => {
            w.u8(2);
            w.u8(u8::from(*b));
        }
        HeaderValue::Bytes(b) => {
            w.u8(3);
            w.bytes(b);
        }
        HeaderValue::Float(f) => {
            w.u8(4);
            w.raw(&f.to_le_bytes());
        }
        HeaderValue::Void => w.u8(5),
    }
}

fn read_value(r: &mut WireReader<'_>) -> Result<HeaderValue, WireError> {
    Ok(match r.u8()? {
        0 => HeaderValue::Str(r.byte_string()?),
        1 => {
            let z = r.varint()?;
            HeaderValue::Int(((z >> 1) as i64) ^ -((z & 1) as i64))
        }
        2 => match r.u8()? {
            0 => HeaderValue::Bool(false),
            1 => HeaderValue::Bool(true),
            _ => return Err(WireError::Invalid("bool")),
        },
        3 => HeaderValue::Bytes(r.bytes()?),
        4 => {
            let b = r.raw(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(&b);
            HeaderValue::Float(f64::from_le_bytes(a))
        }
        5 => HeaderValue::Void,
        _ => return Err(WireError::Invalid("header value tag")),
    })
}

fn write_death(w: &mut WireWriter<'_>, d: &Death) {
    w.str(&d.queue);
    w.u8(match d.reason {
        DeathReason::Rejected => 0,
        DeathReason::Expired => 1,
        DeathReason::MaxLen => 2,
        DeathReason::DeliveryLimit => 3,
        DeathReason::Shed => 4,
    });
    w.varint(d.count);
    w.varint(d.time_ms);
    w.str(&d.exchange);
    w.varint(d.routing_keys.len() as u64);
    for key in &d.routing_keys {
        w.str(key);
    }
}

fn read_death(r: &mut WireReader<'_>) -> Result<Death, WireError> {
    let queue = r.byte_string()?;
    let reason = match r.u8()? {
        0 => DeathReason::Rejected,
        1 => DeathReason::Expired,
        2 => DeathReason::MaxLen,
        3 => DeathReason::DeliveryLimit,
        4 => DeathReason::Shed,
        _ => return Err(WireError::Invalid("death reason")),
    };
    let count = r.varint()?;
    let time_ms = r.varint()?;
    let exchange = r.byte_string()?;
    let n = r.count(1)?;
    let routing_keys = (0..n).map(|_| r.byte_string()).collect::<Result<_, _>>()?;
    Ok(Death {
        queue,
        reason,
        count,
        time_ms,
        exchange,
        routing_keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(e: &Envelope) -> Envelope {
        let mut buf = Vec::new();
        e.write_wire(&mut WireWriter::new(&mut buf));
        let bytes = Bytes::from(buf);
        let mut r = WireReader::new(&bytes);
        let back = Envelope::read_wire(&mut r).expect("decodes");
        assert_eq!(r.remaining(), 0);
        back
    }

    fn same(a: &Envelope, b: &Envelope) {
        // Serde's JSON form covers every field.
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        );
    }

    #[test]
    fn every_field_survives() {
        let mut e = Envelope::new(&b"\x00payload\xff"[..])
            .with_routing_key("orders.eu")
            .with_exchange("orders")
            .with_persistent(true)
            .with_priority(7)
            .with_header("s", "x")
            .with_header("i", -5_i64)
            .with_header("b", true)
            .with_header("f", 1.5_f64)
            .with_header("raw", Bytes::from_static(b"\x01\x02"))
            .with_header("v", HeaderValue::Void)
            .with_content_type("application/json")
            .with_correlation_id("c-1")
            .with_reply_to("replies")
            .with_expiration(Duration::new(3, 500));
        e.record_death("q1", DeathReason::Expired, 1_000);
        e.record_death("q2", DeathReason::Rejected, 2_000);
        e.set_delivery(4, true);
        same(&e, &round_trip(&e));
        let plain = Envelope::new("");
        same(&plain, &round_trip(&plain));
    }

    #[test]
    fn truncated_input_is_an_error_at_every_length() {
        let e = Envelope::new("hello")
            .with_routing_key("k")
            .with_header("h", "v");
        let mut buf = Vec::new();
        e.write_wire(&mut WireWriter::new(&mut buf));
        for len in 0..buf.len() {
            let bytes = Bytes::copy_from_slice(&buf[..len]);
            assert!(
                Envelope::read_wire(&mut WireReader::new(&bytes)).is_err(),
                "{len}"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let bytes = Bytes::from(data);
            let _ = Envelope::read_wire(&mut WireReader::new(&bytes));
        }

        #[test]
        fn varints_round_trip(v in any::<u64>()) {
            let mut buf = Vec::new();
            WireWriter::new(&mut buf).varint(v);
            let bytes = Bytes::from(buf);
            prop_assert_eq!(WireReader::new(&bytes).varint(), Ok(v));
        }

        #[test]
        fn ints_round_trip(i in any::<i64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let e = Envelope::new(payload).with_header("n", i);
            let back = round_trip(&e);
            prop_assert_eq!(back.header("n"), Some(&HeaderValue::Int(i)));
            prop_assert_eq!(back.payload(), e.payload());
        }
    }
}
