//! The few msgpack primitives the event formats need: an infallible writer over `rmp`'s
//! in-memory buffer, and a bounds-checked reader over a byte slice that can skip values it does
//! not know (newer vLLM fields).

use rmp::encode::{self, ByteBuf};
use rmp::Marker;

use crate::error::DecodeError;

/// Writes msgpack into memory; writing to a growable buffer cannot fail.
pub(crate) struct Writer(ByteBuf);

impl Writer {
    pub fn with_capacity(n: usize) -> Self {
        Self(ByteBuf::with_capacity(n))
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.0.into_vec()
    }

    pub fn array(&mut self, len: usize) {
        let Ok(_) = encode::write_array_len(&mut self.0, len as u32);
    }

    pub fn map(&mut self, len: usize) {
        let Ok(_) = encode::write_map_len(&mut self.0, len as u32);
    }

    pub fn str(&mut self, s: &str) {
        let Ok(()) = encode::write_str(&mut self.0, s);
    }

    pub fn bin(&mut self, b: &[u8]) {
        let Ok(()) = encode::write_bin(&mut self.0, b);
    }

    pub fn uint(&mut self, v: u64) {
        let Ok(_) = encode::write_uint(&mut self.0, v);
    }

    pub fn sint(&mut self, v: i64) {
        let Ok(_) = encode::write_sint(&mut self.0, v);
    }

    pub fn f64(&mut self, v: f64) {
        let Ok(()) = encode::write_f64(&mut self.0, v);
    }

    pub fn nil(&mut self) {
        let Ok(()) = encode::write_nil(&mut self.0);
    }
}

/// Reads msgpack values from a slice, checking every length against what is left.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn is_at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(DecodeError::Truncated)?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn peek(&self) -> Result<Marker, DecodeError> {
        self.buf
            .get(self.pos)
            .map(|&b| Marker::from_u8(b))
            .ok_or(DecodeError::Truncated)
    }

    fn marker(&mut self) -> Result<Marker, DecodeError> {
        let m = self.peek()?;
        self.pos += 1;
        Ok(m)
    }

    /// Consumes a nil and returns true, or leaves a non-nil value in place and returns false.
    pub fn nil(&mut self) -> Result<bool, DecodeError> {
        if self.peek()? == Marker::Null {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn is_map(&self) -> Result<bool, DecodeError> {
        Ok(matches!(
            self.peek()?,
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32
        ))
    }

    pub fn is_bin(&self) -> Result<bool, DecodeError> {
        Ok(matches!(
            self.peek()?,
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32
        ))
    }

    pub fn is_str(&self) -> Result<bool, DecodeError> {
        Ok(matches!(
            self.peek()?,
            Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32
        ))
    }

    pub fn array(&mut self) -> Result<usize, DecodeError> {
        match self.marker()? {
            Marker::FixArray(n) => Ok(n as usize),
            Marker::Array16 => Ok(u16::from_be_bytes(self.be()?) as usize),
            Marker::Array32 => Ok(u32::from_be_bytes(self.be()?) as usize),
            m => Err(DecodeError::Unexpected("array", m)),
        }
    }

    pub fn map(&mut self) -> Result<usize, DecodeError> {
        match self.marker()? {
            Marker::FixMap(n) => Ok(n as usize),
            Marker::Map16 => Ok(u16::from_be_bytes(self.be()?) as usize),
            Marker::Map32 => Ok(u32::from_be_bytes(self.be()?) as usize),
            m => Err(DecodeError::Unexpected("map", m)),
        }
    }

    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = match self.marker()? {
            Marker::FixStr(n) => n as usize,
            Marker::Str8 => u8::from_be_bytes(self.be()?) as usize,
            Marker::Str16 => u16::from_be_bytes(self.be()?) as usize,
            Marker::Str32 => u32::from_be_bytes(self.be()?) as usize,
            m => return Err(DecodeError::Unexpected("str", m)),
        };
        std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Utf8)
    }

    pub fn bin(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = match self.marker()? {
            Marker::Bin8 => u8::from_be_bytes(self.be()?) as usize,
            Marker::Bin16 => u16::from_be_bytes(self.be()?) as usize,
            Marker::Bin32 => u32::from_be_bytes(self.be()?) as usize,
            m => return Err(DecodeError::Unexpected("bin", m)),
        };
        self.take(n)
    }

    /// Any msgpack integer, as i128 so both u64 and i64 fit.
    pub fn int(&mut self) -> Result<i128, DecodeError> {
        Ok(match self.marker()? {
            Marker::FixPos(v) => v as i128,
            Marker::FixNeg(v) => v as i128,
            Marker::U8 => u8::from_be_bytes(self.be()?) as i128,
            Marker::U16 => u16::from_be_bytes(self.be()?) as i128,
            Marker::U32 => u32::from_be_bytes(self.be()?) as i128,
            Marker::U64 => u64::from_be_bytes(self.be()?) as i128,
            Marker::I8 => i8::from_be_bytes(self.be()?) as i128,
            Marker::I16 => i16::from_be_bytes(self.be()?) as i128,
            Marker::I32 => i32::from_be_bytes(self.be()?) as i128,
            Marker::I64 => i64::from_be_bytes(self.be()?) as i128,
            m => return Err(DecodeError::Unexpected("int", m)),
        })
    }

    pub fn is_int(&self) -> Result<bool, DecodeError> {
        Ok(matches!(
            self.peek()?,
            Marker::FixPos(_)
                | Marker::FixNeg(_)
                | Marker::U8
                | Marker::U16
                | Marker::U32
                | Marker::U64
                | Marker::I8
                | Marker::I16
                | Marker::I32
                | Marker::I64
        ))
    }

    /// A float (msgspec writes float64; float32 and integers are accepted too).
    pub fn float(&mut self) -> Result<f64, DecodeError> {
        match self.peek()? {
            Marker::F64 => {
                self.pos += 1;
                Ok(f64::from_be_bytes(self.be()?))
            }
            Marker::F32 => {
                self.pos += 1;
                Ok(f32::from_be_bytes(self.be()?) as f64)
            }
            _ => Ok(self.int()? as f64),
        }
    }

    /// Skips one value of any type, nested ones included.
    pub fn skip(&mut self) -> Result<(), DecodeError> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            let n = match self.marker()? {
                Marker::Null | Marker::True | Marker::False => 0,
                Marker::FixPos(_) | Marker::FixNeg(_) => 0,
                Marker::U8 | Marker::I8 => 1,
                Marker::U16 | Marker::I16 => 2,
                Marker::U32 | Marker::I32 | Marker::F32 => 4,
                Marker::U64 | Marker::I64 | Marker::F64 => 8,
                Marker::FixStr(n) => n as usize,
                Marker::Str8 | Marker::Bin8 => u8::from_be_bytes(self.be()?) as usize,
                Marker::Str16 | Marker::Bin16 => u16::from_be_bytes(self.be()?) as usize,
                Marker::Str32 | Marker::Bin32 => u32::from_be_bytes(self.be()?) as usize,
                Marker::FixExt1 => 2,
                Marker::FixExt2 => 3,
                Marker::FixExt4 => 5,
                Marker::FixExt8 => 9,
                Marker::FixExt16 => 17,
                Marker::Ext8 => u8::from_be_bytes(self.be()?) as usize + 1,
                Marker::Ext16 => u16::from_be_bytes(self.be()?) as usize + 1,
                Marker::Ext32 => u32::from_be_bytes(self.be()?) as usize + 1,
                m @ (Marker::FixArray(_) | Marker::Array16 | Marker::Array32) => {
                    pending += self.container_len(m, 1)?;
                    0
                }
                m @ (Marker::FixMap(_) | Marker::Map16 | Marker::Map32) => {
                    pending += self.container_len(m, 2)?;
                    0
                }
                Marker::Reserved => return Err(DecodeError::Unexpected("value", Marker::Reserved)),
            };
            self.take(n)?;
        }
        Ok(())
    }

    /// Items a container announces, bounded by the bytes left (each item takes at least one),
    /// so a hostile length cannot make `skip` spin.
    fn container_len(&mut self, m: Marker, per_entry: usize) -> Result<usize, DecodeError> {
        let n = match m {
            Marker::FixArray(n) | Marker::FixMap(n) => n as usize,
            Marker::Array16 | Marker::Map16 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        };
        let items = n * per_entry;
        if items > self.buf.len() - self.pos {
            return Err(DecodeError::Truncated);
        }
        Ok(items)
    }
}
