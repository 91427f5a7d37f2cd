//! The values of the configuration file and where each came from: [`At`] (a scalar of a
//! [`Leaf`] kind), [`Table`] and [`List`], and how `toml` deserializes them.
//!
//! Every value is read from whatever TOML value stands there and refused, if need be, from
//! inside `toml`'s value deserializer, which points the error at the value's span.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::leaf::{Leaf, Raw};

/// Where a value came from.
#[derive(Clone, Debug)]
pub(super) enum Origin {
    /// Byte range in the configuration file.
    Span(Range<usize>),
    /// A command-line flag (or its environment variable).
    Flag(&'static str),
}

/// A scalar checked as the leaf kind `K`, with where it came from.
pub(super) struct At<K: Leaf> {
    pub value: K::Value,
    pub at: Origin,
}

impl<K: Leaf> At<K> {
    /// The value of `flag`, checked as if it stood in the file.
    pub fn flag(flag: &'static str, raw: Raw) -> Result<Self, String> {
        Ok(At {
            value: K::read(raw)?,
            at: Origin::Flag(flag),
        })
    }
}

/// A TOML table read into `T` (a `#[derive(Deserialize)]` struct of the file format).
pub(super) struct Table<T> {
    pub value: T,
    /// The table's header (or the flag that created it): where errors about the whole
    /// table point.
    pub at: Origin,
}

/// A TOML array of `T`.
pub(super) struct List<T> {
    pub items: Vec<T>,
    pub at: Origin,
}

impl Default for Origin {
    /// The top of the file, where errors about the document point.
    fn default() -> Self {
        Origin::Span(0..0)
    }
}

/// What an array of `Self` is called in messages: `expected an array of tables
/// ([[listener]]), got a table`.
pub(super) trait Item {
    const ARRAY: &'static str;
}

impl<'de, K: Leaf> Deserialize<'de> for At<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (value, at) = spanned::<Self, D>(d)?;
        Ok(At { value, at })
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Table<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (value, at) = spanned::<Self, D>(d)?;
        Ok(Table { value, at })
    }
}

impl<'de, T: Deserialize<'de> + Item> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (items, at) = spanned::<Self, D>(d)?;
        Ok(List { items, at })
    }
}

/// What a value must look like: a table, an array, or (by default) neither. Any other
/// value goes to `scalar`, which reads it or says what was expected.
trait Shape<'de> {
    type Value;

    fn scalar(raw: Raw) -> Result<Self::Value, String>;

    fn table<M: MapAccess<'de>>(mut map: M) -> Result<Self::Value, M::Error> {
        // `toml` hands a date-time over as a one-entry table.
        let raw = match map.next_key::<String>()?.as_deref() {
            Some(DATETIME_KEY) => Raw::Datetime(map.next_value()?),
            _ => Raw::Table,
        };
        Self::scalar(raw).map_err(de::Error::custom)
    }

    fn array<A: SeqAccess<'de>>(_seq: A) -> Result<Self::Value, A::Error> {
        Self::scalar(Raw::Array).map_err(de::Error::custom)
    }
}

/// The key under which `toml` hands a date-time to a visitor.
pub(super) const DATETIME_KEY: &str = "$__toml_private_datetime";

impl<'de, K: Leaf> Shape<'de> for At<K> {
    type Value = K::Value;

    fn scalar(raw: Raw) -> Result<K::Value, String> {
        K::read(raw)
    }
}

impl<'de, T: Deserialize<'de>> Shape<'de> for Table<T> {
    type Value = T;

    fn scalar(raw: Raw) -> Result<T, String> {
        Err(raw.expected("a table"))
    }

    fn table<M: MapAccess<'de>>(map: M) -> Result<T, M::Error> {
        // A date-time is refused by `T` as an unknown key, which `file::parse` rewords.
        T::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

impl<'de, T: Deserialize<'de> + Item> Shape<'de> for List<T> {
    type Value = Vec<T>;

    fn scalar(raw: Raw) -> Result<Vec<T>, String> {
        Err(raw.expected(T::ARRAY))
    }

    fn array<A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(items)
    }
}

/// A value of shape `S` and its span. It is read inside `toml`'s value deserializer, which
/// gives its errors the value's span.
fn spanned<'de, S: Shape<'de>, D: Deserializer<'de>>(d: D) -> Result<(S::Value, Origin), D::Error> {
    let spanned = Spanned::<Shaped<'de, S>>::deserialize(d)?;
    let at = Origin::Span(spanned.span());
    Ok((spanned.into_inner().0, at))
}

struct Shaped<'de, S: Shape<'de>>(S::Value, PhantomData<&'de ()>);

impl<'de, S: Shape<'de>> Deserialize<'de> for Shaped<'de, S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = d.deserialize_any(ShapeVisitor(PhantomData::<S>))?;
        Ok(Shaped(value, PhantomData))
    }
}

/// Hands every TOML value to its shape's `scalar`, `table` or `array`.
struct ShapeVisitor<S>(PhantomData<S>);

impl<'de, S: Shape<'de>> Visitor<'de> for ShapeVisitor<S> {
    type Value = S::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<S::Value, E> {
        S::scalar(Raw::Bool(v)).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<S::Value, E> {
        S::scalar(Raw::Int(v.into())).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<S::Value, E> {
        S::scalar(Raw::Int(v.into())).map_err(E::custom)
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<S::Value, E> {
        S::scalar(Raw::Int(v)).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<S::Value, E> {
        S::scalar(Raw::Float(v)).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<S::Value, E> {
        S::scalar(Raw::Str(v.to_owned())).map_err(E::custom)
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<S::Value, M::Error> {
        S::table(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<S::Value, A::Error> {
        S::array(seq)
    }
}
