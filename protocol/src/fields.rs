//! Request fields read the way vLLM's pydantic models read them: scalars in pydantic's lax mode
//! (`"16"` is a valid integer, `1` a valid boolean), strings and lists strictly. A field that
//! fails reports a pydantic-style [`FieldError`]; [`crate::body`] turns it into vLLM's 400.

use serde::de;
use serde_json::{Map, Value};

/// Separates the parts of a [`FieldError`] carried through serde's string-only custom errors.
const PART_SEP: char = '\u{1f}';
/// Separates the segments of a [`FieldError`]'s sub-path.
const PATH_SEP: char = '\u{1e}';

/// One step into a JSON document.
#[derive(Debug, Clone, PartialEq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A schema failure of one field: pydantic's error `type` and `msg`, and where inside the field
/// it happened (for unions checked by hand, e.g. `prompt[3]`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub kind: &'static str,
    pub msg: String,
    pub sub_path: Vec<PathSeg>,
}

impl FieldError {
    pub fn new(kind: &'static str, msg: impl Into<String>) -> Self {
        Self {
            kind,
            msg: msg.into(),
            sub_path: Vec::new(),
        }
    }

    /// The same error, one level deeper (`seg` is prepended to the sub-path).
    pub(crate) fn at(mut self, seg: PathSeg) -> Self {
        self.sub_path.insert(0, seg);
        self
    }

    pub(crate) fn into_de<E: de::Error>(self) -> E {
        let path: Vec<String> = self
            .sub_path
            .iter()
            .map(|s| match s {
                PathSeg::Key(k) => format!("k{k}"),
                PathSeg::Index(i) => format!("i{i}"),
            })
            .collect();
        E::custom(format!(
            "{}{PART_SEP}{}{PART_SEP}{}",
            self.kind,
            self.msg,
            path.join(&PATH_SEP.to_string())
        ))
    }

    /// Reads back an error made by [`FieldError::into_de`]; other serde messages (e.g. `missing
    /// field`) become pydantic's equivalents.
    pub fn from_serde_message(message: &str) -> Self {
        let mut parts = message.splitn(3, PART_SEP);
        if let (Some(kind), Some(msg), Some(path)) = (parts.next(), parts.next(), parts.next()) {
            let sub_path = path
                .split(PATH_SEP)
                .filter(|s| !s.is_empty())
                .map(|s| match s.split_at(1) {
                    ("i", i) => i
                        .parse()
                        .map(PathSeg::Index)
                        .unwrap_or(PathSeg::Key(i.into())),
                    (_, k) => PathSeg::Key(k.to_string()),
                })
                .collect();
            return Self {
                kind: known_kind(kind),
                msg: msg.to_string(),
                sub_path,
            };
        }
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
        {
            return Self::new("missing", "Field required").at(PathSeg::Key(field.to_string()));
        }
        Self::new("value_error", message)
    }
}

/// Maps a kind read back from a serde message onto the static set this module produces.
fn known_kind(kind: &str) -> &'static str {
    const KINDS: &[&str] = &[
        "int_type",
        "int_parsing",
        "int_from_float",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "string_type",
        "list_type",
        "dict_type",
        "missing",
        "greater_than_equal",
        "less_than_equal",
        "string_too_short",
        "string_too_long",
    ];
    KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("value_error")
}

fn int_type() -> FieldError {
    FieldError::new("int_type", "Input should be a valid integer")
}

/// An integer as pydantic reads it in lax mode.
pub fn lax_int(v: &Value) -> Result<i64, FieldError> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i)
            } else if n.is_u64() {
                Err(FieldError::new(
                    "less_than_equal",
                    format!("Input should be less than or equal to {}", i64::MAX),
                ))
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.2e18 {
                    Ok(f as i64)
                } else {
                    Err(FieldError::new(
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part",
                    ))
                }
            }
        }
        Value::Bool(b) => Ok(i64::from(*b)),
        Value::String(s) => s.trim().parse().map_err(|_| {
            FieldError::new(
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
            )
        }),
        _ => Err(int_type()),
    }
}

/// A float as pydantic reads it in lax mode (numeric strings, `"inf"`, booleans).
pub fn lax_float(v: &Value) -> Result<f64, FieldError> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => Ok(f64::from(u8::from(*b))),
        Value::String(s) => s.trim().parse().map_err(|_| {
            FieldError::new(
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            )
        }),
        _ => Err(FieldError::new(
            "float_type",
            "Input should be a valid number",
        )),
    }
}

/// A boolean as pydantic reads it in lax mode (`0`/`1`, `"yes"`, `"off"`, …).
pub fn lax_bool(v: &Value) -> Result<bool, FieldError> {
    let unparsable = || {
        FieldError::new(
            "bool_parsing",
            "Input should be a valid boolean, unable to interpret input",
        )
    };
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Ok(false),
            Some(1.0) => Ok(true),
            _ => Err(unparsable()),
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Ok(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Ok(true),
            _ => Err(unparsable()),
        },
        _ => Err(FieldError::new(
            "bool_type",
            "Input should be a valid boolean",
        )),
    }
}

/// A string; pydantic does not turn numbers into strings.
pub fn strict_str(v: &Value) -> Result<String, FieldError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(FieldError::new(
            "string_type",
            "Input should be a valid string",
        )),
    }
}

pub(crate) fn list_items(v: &Value) -> Result<&Vec<Value>, FieldError> {
    v.as_array()
        .ok_or_else(|| FieldError::new("list_type", "Input should be a valid list"))
}

/// Parses every item of a list with `f`, locating a failure at its index.
pub(crate) fn each<T>(
    items: &[Value],
    f: impl Fn(&Value) -> Result<T, FieldError>,
) -> Result<Vec<T>, FieldError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| f(v).map_err(|e| e.at(PathSeg::Index(i))))
        .collect()
}

/// A non-negative integer (pydantic `Annotated[int, Field(ge=0)]`), e.g. a token id.
pub(crate) fn non_negative_int(v: &Value) -> Result<i64, FieldError> {
    let i = lax_int(v)?;
    if i < 0 {
        return Err(FieldError::new(
            "greater_than_equal",
            "Input should be greater than or equal to 0",
        ));
    }
    Ok(i)
}

/// Implements `Deserialize` through a `&Value -> Result<T, FieldError>` reader.
macro_rules! read_via_value {
    ($ty:ty, $reader:expr) => {
        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = <::serde_json::Value as ::serde::Deserialize>::deserialize(d)?;
                $reader(&v).map_err($crate::fields::FieldError::into_de)
            }
        }
    };
}
pub(crate) use read_via_value;

/// Lax integer field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaxInt(pub i64);
read_via_value!(LaxInt, |v| lax_int(v).map(LaxInt));

/// Lax float field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaxFloat(pub f64);
read_via_value!(LaxFloat, |v| lax_float(v).map(LaxFloat));

/// Lax boolean field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaxBool(pub bool);
read_via_value!(LaxBool, |v| lax_bool(v).map(LaxBool));

/// String field (no coercion from other types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Str(pub String);
read_via_value!(Str, |v| strict_str(v).map(Str));

/// A list of lax integers (token ids).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IntList(pub Vec<i64>);
read_via_value!(IntList, |v| list_items(v)
    .and_then(|items| each(items, lax_int))
    .map(IntList));

/// A list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StrList(pub Vec<String>);
read_via_value!(StrList, |v| list_items(v)
    .and_then(|items| each(items, strict_str))
    .map(StrList));

/// A JSON object kept as is (`dict[str, Any]`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dict(pub Map<String, Value>);
read_via_value!(Dict, |v: &Value| v
    .as_object()
    .cloned()
    .map(Dict)
    .ok_or_else(|| FieldError::new(
        "dict_type",
        "Input should be a valid dictionary"
    )));

/// `logit_bias`: `dict[str, float]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FloatDict(pub Vec<(String, f64)>);
read_via_value!(FloatDict, |v: &Value| {
    let obj = v
        .as_object()
        .ok_or_else(|| FieldError::new("dict_type", "Input should be a valid dictionary"))?;
    obj.iter()
        .map(|(k, v)| {
            lax_float(v)
                .map(|f| (k.clone(), f))
                .map_err(|e| e.at(PathSeg::Key(k.clone())))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(FloatDict)
});

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lax_scalars_follow_pydantic() {
        assert_eq!(lax_int(&json!("16")), Ok(16));
        assert_eq!(lax_int(&json!(3.0)), Ok(3));
        assert_eq!(lax_int(&json!(true)), Ok(1));
        assert_eq!(lax_int(&json!(3.5)).unwrap_err().kind, "int_from_float");
        assert_eq!(lax_int(&json!("x")).unwrap_err().kind, "int_parsing");
        assert_eq!(lax_int(&json!(null)).unwrap_err().kind, "int_type");
        assert_eq!(lax_float(&json!("0.5")), Ok(0.5));
        assert_eq!(lax_float(&json!(2)), Ok(2.0));
        assert_eq!(lax_float(&json!([1])).unwrap_err().kind, "float_type");
        assert_eq!(lax_bool(&json!("yes")), Ok(true));
        assert_eq!(lax_bool(&json!(0)), Ok(false));
        assert_eq!(lax_bool(&json!(2)).unwrap_err().kind, "bool_parsing");
        assert_eq!(lax_bool(&json!({})).unwrap_err().kind, "bool_type");
        assert_eq!(strict_str(&json!(5)).unwrap_err().kind, "string_type");
    }
}
