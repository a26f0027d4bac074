//! Pluggable payload codecs.

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

/// Turns typed values into payload bytes and back.
///
/// Implementations are usually zero-sized marker types; the methods take `&self` so that
/// a codec may also carry configuration (a schema registry handle, compression level...).
///
/// The runtime moves payloads around as opaque [`Bytes`]; a [`Codec`] is what turns a
/// typed value into those bytes and back. [`Json`] is the default and is what
/// [`Envelope::encode`](crate::envelope::Envelope::encode) and
/// [`Envelope::decode`](crate::envelope::Envelope::decode) use. Any other format can be
/// plugged in by implementing [`Codec`] and passing it to
/// [`Envelope::encode_with`](crate::envelope::Envelope::encode_with) /
/// [`Envelope::decode_with`](crate::envelope::Envelope::decode_with):
///
/// ```
/// use bytes::Bytes;
/// use postbox_actors::{Codec, CodecError};
/// use postbox_actors::Envelope;
/// use serde::{Serialize, de::DeserializeOwned};
///
/// /// JSON, indented for humans reading a queue dump.
/// struct PrettyJson;
///
/// impl Codec for PrettyJson {
///     const CONTENT_TYPE: &'static str = "application/json";
///
///     fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
///         serde_json::to_vec_pretty(value)
///             .map(Bytes::from)
///             .map_err(|e| CodecError::Encode(e.to_string()))
///     }
///
///     fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
///         serde_json::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
///     }
/// }
///
/// let envelope = Envelope::encode_with(&PrettyJson, &vec![1, 2, 3])?;
/// assert_eq!(envelope.content_type(), Some("application/json"));
/// assert_eq!(envelope.payload().as_ref(), b"[\n  1,\n  2,\n  3\n]");
/// let back: Vec<i32> = envelope.decode_with(&PrettyJson)?;
/// assert_eq!(back, [1, 2, 3]);
/// # Ok::<(), CodecError>(())
/// ```
pub trait Codec {
    /// The MIME type written to an envelope's content type when this codec encodes it.
    const CONTENT_TYPE: &'static str;

    /// Serializes `value` into payload bytes.
    ///
    /// # Errors
    /// [`CodecError::Encode`] when the value cannot be represented in this format.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError>;

    /// Deserializes a value of type `T` from payload bytes.
    ///
    /// # Errors
    /// [`CodecError::Decode`] when the bytes are malformed or do not describe a `T`.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError>;
}

/// The default codec: compact JSON through `serde_json`, content type `application/json`.
///
/// ```
/// use postbox_actors::{Codec, Json};
///
/// let bytes = Json.encode(&("ping", 1))?;
/// assert_eq!(bytes.as_ref(), br#"["ping",1]"#);
/// let (word, n): (String, u32) = Json.decode(&bytes)?;
/// assert_eq!((word.as_str(), n), ("ping", 1));
/// # Ok::<(), postbox_actors::CodecError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Json;

impl Codec for Json {
    const CONTENT_TYPE: &'static str = "application/json";

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, CodecError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| CodecError::Encode(e.to_string()))
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError::Decode(e.to_string()))
    }
}

/// Why a payload could not be encoded or decoded.
///
/// The underlying format error is kept as text so that the error stays `Clone` and
/// comparable whatever codec produced it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The value could not be serialized.
    #[error("encode: {0}")]
    Encode(String),
    /// The payload could not be deserialized into the requested type.
    #[error("decode: {0}")]
    Decode(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips() {
        let bytes = Json.encode(&[1u8, 2, 3]).unwrap();
        assert_eq!(bytes.as_ref(), b"[1,2,3]");
        let back: Vec<u8> = Json.decode(&bytes).unwrap();
        assert_eq!(back, [1, 2, 3]);
    }

    #[test]
    fn json_encodes_unsized_values() {
        let bytes = Json.encode("text").unwrap();
        assert_eq!(bytes.as_ref(), br#""text""#);
    }

    #[test]
    fn json_decode_error_is_typed() {
        let err = Json.decode::<u32>(b"not json").unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{err:?}");
        assert!(err.to_string().starts_with("decode: "));
    }

    #[test]
    fn json_encode_error_is_typed() {
        // JSON object keys must be strings; a map keyed by tuples cannot be written.
        let map = std::collections::BTreeMap::from([((1, 2), 3)]);
        let err = Json.encode(&map).unwrap_err();
        assert!(matches!(err, CodecError::Encode(_)), "{err:?}");
    }
}
