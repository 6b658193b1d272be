//! One transcript line read for what the usage rules use, in one pass: serde
//! visits the line's object and keeps only the fields the rules read
//! (strings borrowed from the line where they have no escapes), and skips the
//! rest without building it (no `Value` tree, no map of every key). Fields
//! the rules do not read may hold anything.
//!
//! What is kept is judged exactly as [`serde_json::Value`] would have it: a
//! repeated key counts with its last value, numbers are [`Number`]s built the
//! way `Value` builds them. The one difference: a string that is skipped is
//! checked for JSON syntax but not decoded, so a lone surrogate escape
//! (`"\ud83d"`, which JavaScript writes for a cut-off emoji and `JSON.parse`
//! accepts) in a field the rules do not read does not make the line
//! unreadable.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

/// A value the rules read: its type, and its content when it is a scalar.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar<'a> {
    /// `null`, an array or an object (read past).
    Other,
    Bool(bool),
    Num(Number),
    Str(Cow<'a, str>),
}

impl<'a> Scalar<'a> {
    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// `Value::as_u64`: a non-negative integer that fits.
    pub(super) fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Num(n) => n.as_u64(),
            _ => None,
        }
    }
}

/// Reads any value; arrays and objects are skipped.
struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Num(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Num(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        // As `Value` does: a non-finite float (never parsed from JSON) is null.
        Ok(Number::from_f64(v).map_or(Scalar::Other, Scalar::Num))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// Visits a value that may be of any type: `map` reads an object; anything
/// else is read past and becomes `other`.
macro_rules! any_value_visitor {
    ($visitor:ident, $value:ty, $expecting:literal, other = $other:expr, map = |$m:ident| $body:expr) => {
        struct $visitor;

        impl<'de> Visitor<'de> for $visitor {
            type Value = $value;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str($expecting)
            }

            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok($other)
            }

            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok($other)
            }

            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok($other)
            }

            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok($other)
            }

            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok($other)
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok($other)
            }

            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok($other)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok($other)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut $m: A) -> Result<Self::Value, A::Error> {
                $body
            }
        }
    };
}

/// Which field a key names (of the line, its message, usage, `cache_creation`
/// or a progress line's `data`); `Other` for every key the rules do not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Type,
    Message,
    Timestamp,
    RequestId,
    IsSidechain,
    Data,
    Id,
    Model,
    Usage,
    InputTokens,
    OutputTokens,
    CacheCreationInputTokens,
    CacheReadInputTokens,
    CacheCreation,
    Ephemeral5m,
    Ephemeral1h,
    Other,
}

impl Key {
    fn of(s: &str) -> Key {
        match s {
            "type" => Key::Type,
            "message" => Key::Message,
            "timestamp" => Key::Timestamp,
            "requestId" => Key::RequestId,
            "isSidechain" => Key::IsSidechain,
            "data" => Key::Data,
            "id" => Key::Id,
            "model" => Key::Model,
            "usage" => Key::Usage,
            "input_tokens" => Key::InputTokens,
            "output_tokens" => Key::OutputTokens,
            "cache_creation_input_tokens" => Key::CacheCreationInputTokens,
            "cache_read_input_tokens" => Key::CacheReadInputTokens,
            "cache_creation" => Key::CacheCreation,
            "ephemeral_5m_input_tokens" => Key::Ephemeral5m,
            "ephemeral_1h_input_tokens" => Key::Ephemeral1h,
            _ => Key::Other,
        }
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
        Ok(Key::of(v))
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

/// `message.usage.cache_creation`: the cache writes by lifetime.
#[derive(Debug, Default, PartialEq)]
pub(super) struct CacheCreationFields<'a> {
    pub ephemeral_5m: Option<Scalar<'a>>,
    pub ephemeral_1h: Option<Scalar<'a>>,
}

#[derive(Debug, PartialEq)]
pub(super) enum CacheCreation<'a> {
    /// `null`: as if absent.
    Null,
    /// A string, number, boolean or array.
    NotObject,
    Object(CacheCreationFields<'a>),
}

struct CacheCreationVisitor;

impl<'de> Visitor<'de> for CacheCreationVisitor {
    type Value = CacheCreation<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("message.usage.cache_creation")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(CacheCreation::NotObject)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(CacheCreation::NotObject)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(CacheCreation::NotObject)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(CacheCreation::NotObject)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(CacheCreation::NotObject)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(CacheCreation::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(CacheCreation::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(CacheCreation::NotObject)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut c = CacheCreationFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Ephemeral5m => &mut c.ephemeral_5m,
                Key::Ephemeral1h => &mut c.ephemeral_1h,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(CacheCreation::Object(c))
    }
}

impl<'de> Deserialize<'de> for CacheCreation<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CacheCreationVisitor)
    }
}

/// `message.usage`: the counts the rules read.
#[derive(Debug, Default, PartialEq)]
pub(super) struct UsageFields<'a> {
    pub input_tokens: Option<Scalar<'a>>,
    pub output_tokens: Option<Scalar<'a>>,
    pub cache_creation_input_tokens: Option<Scalar<'a>>,
    pub cache_read_input_tokens: Option<Scalar<'a>>,
    pub cache_creation: Option<CacheCreation<'a>>,
}

#[derive(Debug, PartialEq)]
pub(super) enum Usage<'a> {
    NotObject,
    Object(UsageFields<'a>),
}

any_value_visitor!(
    UsageVisitor,
    Usage<'de>,
    "message.usage",
    other = Usage::NotObject,
    map = |map| {
        let mut u = UsageFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::InputTokens => &mut u.input_tokens,
                Key::OutputTokens => &mut u.output_tokens,
                Key::CacheCreationInputTokens => &mut u.cache_creation_input_tokens,
                Key::CacheReadInputTokens => &mut u.cache_read_input_tokens,
                Key::CacheCreation => {
                    u.cache_creation = Some(map.next_value()?);
                    continue;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(Usage::Object(u))
    }
);

impl<'de> Deserialize<'de> for Usage<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UsageVisitor)
    }
}

/// The line's `message`, when it is an object.
#[derive(Debug, Default, PartialEq)]
pub(super) struct MessageFields<'a> {
    pub id: Option<Scalar<'a>>,
    pub model: Option<Scalar<'a>>,
    pub usage: Option<Usage<'a>>,
}

#[derive(Debug, PartialEq)]
pub(super) enum Message<'a> {
    NotObject,
    Object(MessageFields<'a>),
}

any_value_visitor!(
    MessageVisitor,
    Message<'de>,
    "message",
    other = Message::NotObject,
    map = |map| {
        let mut m = MessageFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Id => m.id = Some(map.next_value()?),
                Key::Model => m.model = Some(map.next_value()?),
                Key::Usage => m.usage = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Message::Object(m))
    }
);

impl<'de> Deserialize<'de> for Message<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MessageVisitor)
    }
}

/// A progress line's `data`: `message` is the sub-agent's line it reports.
#[derive(Debug, PartialEq)]
pub(super) enum Data<'a> {
    NotObject,
    Object { message: Option<Inner<'a>> },
}

any_value_visitor!(
    DataVisitor,
    Data<'de>,
    "data",
    other = Data::NotObject,
    map = |map| {
        let mut message = None;
        while let Some(key) = map.next_key::<Key>()? {
            if key == Key::Message {
                message = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Data::Object { message })
    }
);

impl<'de> Deserialize<'de> for Data<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DataVisitor)
    }
}

/// A line nested in a progress line's `data.message`, when it is an object.
#[derive(Debug, PartialEq)]
pub(super) enum Inner<'a> {
    NotObject,
    Object(Box<Line<'a>>),
}

any_value_visitor!(
    InnerVisitor,
    Inner<'de>,
    "data.message",
    other = Inner::NotObject,
    map = |map| Ok(Inner::Object(Box::new(read_line(&mut map)?)))
);

impl<'de> Deserialize<'de> for Inner<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(InnerVisitor)
    }
}

/// A line's object: the fields the usage rules read.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Line<'a> {
    pub r#type: Option<Scalar<'a>>,
    pub message: Option<Message<'a>>,
    pub timestamp: Option<Scalar<'a>>,
    pub request_id: Option<Scalar<'a>>,
    pub is_sidechain: Option<Scalar<'a>>,
    pub data: Option<Data<'a>>,
}

fn read_line<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Line<'de>, A::Error> {
    let mut l = Line::default();
    while let Some(key) = map.next_key::<Key>()? {
        let slot = match key {
            Key::Message => {
                l.message = Some(map.next_value()?);
                continue;
            }
            Key::Data => {
                l.data = Some(map.next_value()?);
                continue;
            }
            Key::Type => &mut l.r#type,
            Key::Timestamp => &mut l.timestamp,
            Key::RequestId => &mut l.request_id,
            Key::IsSidechain => &mut l.is_sidechain,
            _ => {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
        };
        *slot = Some(map.next_value()?);
    }
    Ok(l)
}

struct LineVisitor;

impl<'de> Visitor<'de> for LineVisitor {
    type Value = Line<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Line<'de>, A::Error> {
        read_line(&mut map)
    }
}

impl<'de> Deserialize<'de> for Line<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Anything but an object is refused (the line is unreadable).
        d.deserialize_map(LineVisitor)
    }
}

/// The line's fields, or `None` when it is not one JSON object.
pub(super) fn parse(text: &str) -> Option<Line<'_>> {
    serde_json::from_str(text).ok()
}
