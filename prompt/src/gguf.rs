//! GGUF metadata: the key/value section at the head of a `.gguf` file, read without the tensor
//! infos or tensor data that follow it (a 135M model's text side is ~1.5 MB of a 90 MB file).
//!
//! Layout (little-endian): magic `GGUF`, version (1: 32-bit lengths; 2, 3: 64-bit), tensor count,
//! key/value count, then each key (length-prefixed string), a value type and its value. Strings
//! are taken as llama.cpp writes them in practice: trailing NULs dropped, invalid UTF-8 replaced,
//! as candle's reader (which loads the weights in the agent) does, so both see the same tokens.
//! Every length is checked against what is left of the file before anything is allocated.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::LoadError;

/// Arrays nested deeper than this are refused (llama.cpp writes at most one level).
const MAX_DEPTH: usize = 8;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type as i64 (writers differ in the integer width they use).
    pub fn as_int(&self) -> Option<i64> {
        match *self {
            Self::U8(x) => Some(x.into()),
            Self::I8(x) => Some(x.into()),
            Self::U16(x) => Some(x.into()),
            Self::I16(x) => Some(x.into()),
            Self::U32(x) => Some(x.into()),
            Self::I32(x) => Some(x.into()),
            Self::U64(x) => i64::try_from(x).ok(),
            Self::I64(x) => Some(x),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(items) => Some(items),
            _ => None,
        }
    }
}

const MAGIC: &[u8; 4] = b"GGUF";

/// Checks that `reader` starts with the GGUF magic and leaves it at the start again, so that a
/// caller with its own header parser (the agent's weight loader) refuses the same files we do.
pub fn check_magic<R: Read + Seek>(reader: &mut R, path: &Path) -> Result<(), LoadError> {
    let mut magic = [0u8; 4];
    reader
        .seek(SeekFrom::Start(0))
        .map_err(LoadError::io(path))?;
    match reader.read_exact(&mut magic) {
        Ok(()) if &magic == MAGIC => {}
        Ok(()) => return Err(LoadError::NotGguf(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(LoadError::NotGguf(path.to_path_buf()))
        }
        Err(e) => return Err(LoadError::io(path)(e)),
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(LoadError::io(path))?;
    Ok(())
}

/// The metadata of one GGUF file.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    pub(crate) entries: HashMap<String, MetaValue>,
}

impl Metadata {
    /// Reads the metadata of the GGUF at `path`.
    pub fn read_path(path: &Path) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path).map_err(LoadError::io(path))?;
        Self::read(BufReader::new(file), path)
    }

    /// Reads the metadata from the start of `reader`; `path` names the file in errors.
    pub fn read<R: Read + Seek>(mut reader: R, path: &Path) -> Result<Self, LoadError> {
        let size = reader.seek(SeekFrom::End(0)).map_err(LoadError::io(path))?;
        check_magic(&mut reader, path)?;
        let mut r = Cursor {
            reader,
            left: size,
            path,
            wide_lengths: true,
        };
        r.array::<4>()?;
        r.wide_lengths = match r.u32()? {
            1 => false,
            2 | 3 => true,
            v => return Err(r.malformed(format!("unsupported GGUF version {v}"))),
        };
        let _tensor_count = r.length()?;
        let kv_count = r.length()?;
        // A key/value is at least a length prefix, a type and one byte.
        r.fits(kv_count, r.prefix_bytes() + 5, "metadata entries")?;
        let mut entries = HashMap::with_capacity(kv_count as usize);
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0)?;
            entries.insert(key, value);
        }
        Ok(Self { entries })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.entries.get(key)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }
}

/// A bounded reader over the file: `left` is what remains after the current position.
struct Cursor<'p, R> {
    reader: R,
    left: u64,
    path: &'p Path,
    wide_lengths: bool,
}

impl<R: Read> Cursor<'_, R> {
    fn malformed(&self, reason: String) -> LoadError {
        LoadError::malformed(PathBuf::from(self.path), reason)
    }

    fn bytes(&mut self, buf: &mut [u8]) -> Result<(), LoadError> {
        if buf.len() as u64 > self.left {
            return Err(self.malformed("metadata runs past the end of the file".into()));
        }
        self.reader
            .read_exact(buf)
            .map_err(LoadError::io(self.path))?;
        self.left -= buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], LoadError> {
        let mut b = [0u8; N];
        self.bytes(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, LoadError> {
        self.array().map(u32::from_le_bytes)
    }

    fn prefix_bytes(&self) -> u64 {
        if self.wide_lengths {
            8
        } else {
            4
        }
    }

    fn length(&mut self) -> Result<u64, LoadError> {
        if self.wide_lengths {
            self.array().map(u64::from_le_bytes)
        } else {
            self.u32().map(u64::from)
        }
    }

    /// Refuses `count` items of at least `min_bytes` each that cannot fit in the rest.
    fn fits(&self, count: u64, min_bytes: u64, what: &str) -> Result<(), LoadError> {
        if count.saturating_mul(min_bytes) > self.left {
            return Err(self.malformed(format!(
                "{count} {what} cannot fit in the {} bytes left",
                self.left
            )));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, LoadError> {
        let len = self.length()?;
        self.fits(len, 1, "string bytes")?;
        let mut buf = vec![0u8; len as usize];
        self.bytes(&mut buf)?;
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<MetaValue, LoadError> {
        use MetaValue as V;
        Ok(match kind {
            0 => V::U8(u8::from_le_bytes(self.array()?)),
            1 => V::I8(i8::from_le_bytes(self.array()?)),
            2 => V::U16(u16::from_le_bytes(self.array()?)),
            3 => V::I16(i16::from_le_bytes(self.array()?)),
            4 => V::U32(self.u32()?),
            5 => V::I32(i32::from_le_bytes(self.array()?)),
            6 => V::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()? {
                [0] => V::Bool(false),
                [1] => V::Bool(true),
                [b] => return Err(self.malformed(format!("boolean byte {b}"))),
            },
            8 => V::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.malformed("arrays nested too deep".into()));
                }
                let item_kind = self.u32()?;
                let len = self.length()?;
                let min_bytes = match item_kind {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 => self.prefix_bytes(),
                    9 => 4 + self.prefix_bytes(),
                    _ => 8,
                };
                self.fits(len, min_bytes, "array items")?;
                let items = (0..len)
                    .map(|_| self.value(item_kind, depth + 1))
                    .collect::<Result<_, _>>()?;
                V::Array(items)
            }
            10 => V::U64(u64::from_le_bytes(self.array()?)),
            11 => V::I64(i64::from_le_bytes(self.array()?)),
            12 => V::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.malformed(format!("unknown metadata value type {other}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor as Mem;

    /// A v3 GGUF header with the given key/values (values already encoded with their type).
    fn gguf(entries: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((entries.len() as u64).to_le_bytes());
        for (key, kind, value) in entries {
            out.extend(str_bytes(key));
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        out
    }

    fn str_bytes(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend(s.as_bytes());
        out
    }

    fn read(bytes: Vec<u8>) -> Result<Metadata, LoadError> {
        Metadata::read(Mem::new(bytes), Path::new("t.gguf"))
    }

    #[test]
    fn reads_scalars_strings_and_arrays() {
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend(2u64.to_le_bytes());
        tokens.extend(str_bytes("a"));
        tokens.extend(str_bytes("b\0"));
        let md = read(gguf(&[
            ("general.architecture", 8, str_bytes("llama")),
            ("llama.block_count", 4, 30u32.to_le_bytes().to_vec()),
            ("llama.eps", 6, 1e-5f32.to_le_bytes().to_vec()),
            ("flag", 7, vec![1]),
            ("tokenizer.ggml.tokens", 9, tokens),
        ]))
        .unwrap();
        assert_eq!(
            md.get("general.architecture").and_then(MetaValue::as_str),
            Some("llama")
        );
        assert_eq!(
            md.get("llama.block_count").and_then(MetaValue::as_int),
            Some(30)
        );
        assert_eq!(md.get("llama.eps"), Some(&MetaValue::F32(1e-5)));
        assert_eq!(md.get("flag"), Some(&MetaValue::Bool(true)));
        let tokens = md.get("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        // A trailing NUL is dropped, as llama.cpp's writers sometimes leave one.
        assert_eq!(
            tokens,
            [MetaValue::String("a".into()), MetaValue::String("b".into())]
        );
    }

    #[test]
    fn hostile_headers_are_refused_before_allocating() {
        assert!(matches!(read(b"nope".to_vec()), Err(LoadError::NotGguf(_))));
        assert!(matches!(read(b"GG".to_vec()), Err(LoadError::NotGguf(_))));
        // A key/value count no file of this size can hold.
        let mut huge = b"GGUF".to_vec();
        huge.extend(3u32.to_le_bytes());
        huge.extend(0u64.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        let err = read(huge).unwrap_err();
        assert!(err.to_string().contains("cannot fit"), "{err}");
        // A string claiming 1 TB, and an array claiming 2^40 items.
        assert!(read(gguf(&[("k", 8, (1u64 << 40).to_le_bytes().to_vec())])).is_err());
        let mut arr = 4u32.to_le_bytes().to_vec();
        arr.extend((1u64 << 40).to_le_bytes());
        assert!(read(gguf(&[("k", 9, arr)])).is_err());
        // Truncated values, unknown types, bad booleans, nesting.
        assert!(read(gguf(&[("k", 4, vec![1, 2])])).is_err());
        assert!(read(gguf(&[("k", 13, vec![0; 8])])).is_err());
        assert!(read(gguf(&[("k", 7, vec![2])])).is_err());
        let mut nested = Vec::new();
        for _ in 0..MAX_DEPTH + 1 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        nested.extend(0u32.to_le_bytes());
        nested.extend(0u64.to_le_bytes());
        let err = read(gguf(&[("k", 9, nested)])).unwrap_err();
        assert!(err.to_string().contains("too deep"), "{err}");
        let mut v9 = b"GGUF".to_vec();
        v9.extend(9u32.to_le_bytes());
        assert!(read(v9).unwrap_err().to_string().contains("version 9"));
    }
}
