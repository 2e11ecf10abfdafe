//! Why a KV-event payload could not be decoded (shared by the batch decoder and its msgpack
//! reader).

use rmp::Marker;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("payload ends in the middle of a value")]
    Truncated,
    #[error("expected {0}, found msgpack marker {1:?}")]
    Unexpected(&'static str, Marker),
    #[error("string is not UTF-8")]
    Utf8,
    #[error("{0} is out of range")]
    OutOfRange(&'static str),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("bytes left after the batch")]
    TrailingBytes,
}
