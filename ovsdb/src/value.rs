//! OVSDB's data model (RFC 7047 §5.1): atoms, sets and maps, and their JSON notation.

use std::{collections::BTreeMap, fmt};

use serde_json::{Value as Json, json};

use crate::{error::Error, schema::ColumnKind};

/// A row UUID, kept in its canonical text form (`8-4-4-4-12` lowercase hex).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uuid(pub String);

impl Uuid {
    /// Checks the text form and lowercases it.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if Self::number_of(s).is_none() {
            return Err(Error::Protocol(format!("not a UUID: {s:?}")));
        }
        Ok(Uuid(if s.bytes().any(|c| c.is_ascii_uppercase()) {
            s.to_ascii_lowercase()
        } else {
            s.to_owned()
        }))
    }

    /// The number a UUID's text (`8-4-4-4-12` hex digits, either case) spells, if it is
    /// one: [`Uuid::as_u128`] without a [`Uuid`] first.
    pub fn number_of(text: &str) -> Option<u128> {
        let bytes = text.as_bytes();
        if bytes.len() != 36 {
            return None;
        }
        let mut n = 0u128;
        for (i, &c) in bytes.iter().enumerate() {
            let digit = match c {
                b'-' if matches!(i, 8 | 13 | 18 | 23) => continue,
                _ if matches!(i, 8 | 13 | 18 | 23) => return None,
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return None,
            };
            n = (n << 4) | u128::from(digit);
        }
        Some(n)
    }

    /// The UUID as a number: a compact key (16 bytes, no allocation) for a client that keeps
    /// many rows in its own form.
    pub fn as_u128(&self) -> u128 {
        Self::number_of(&self.0).unwrap_or_else(|| panic!("not a UUID: {:?}", self.0))
    }

    /// The UUID a number from [`Uuid::as_u128`] stands for.
    pub fn from_u128(n: u128) -> Self {
        let h = format!("{n:032x}");
        Uuid(format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        ))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A single OVSDB value.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
pub enum Atom {
    /// 64-bit integer.
    Integer(i64),
    /// Floating point number.
    Real(f64),
    /// Boolean.
    Boolean(bool),
    /// UTF-8 string.
    String(String),
    /// Reference to a row.
    Uuid(Uuid),
    /// Reference to a row inserted earlier in the same transaction, by its `uuid-name`.
    NamedUuid(String),
}

impl Atom {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Atom::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Atom::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The UUID, if this is one.
    pub fn as_uuid(&self) -> Option<&Uuid> {
        match self {
            Atom::Uuid(u) => Some(u),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Atom::Boolean(b) => Some(*b),
            _ => None,
        }
    }

    /// JSON notation.
    pub fn to_json(&self) -> Json {
        match self {
            Atom::Integer(i) => json!(i),
            Atom::Real(r) => json!(r),
            Atom::Boolean(b) => json!(b),
            Atom::String(s) => json!(s),
            Atom::Uuid(u) => json!(["uuid", u.0]),
            Atom::NamedUuid(n) => json!(["named-uuid", n]),
        }
    }

    /// Parses JSON notation.
    pub fn from_json(j: &Json) -> Result<Self, Error> {
        match j {
            Json::Bool(b) => Ok(Atom::Boolean(*b)),
            Json::String(s) => Ok(Atom::String(s.clone())),
            // An integer beyond i64 is refused, as the streaming parser refuses it; a number
            // with a fraction or an exponent is a real.
            Json::Number(n) => match (n.as_i64(), n.is_f64()) {
                (Some(i), _) => Ok(Atom::Integer(i)),
                (None, true) => n
                    .as_f64()
                    .map(Atom::Real)
                    .ok_or_else(|| Error::Protocol(format!("bad number {n}"))),
                (None, false) => Err(Error::Protocol(format!("integer {n} out of range"))),
            },
            Json::Array(a) => match (a.first().and_then(Json::as_str), a.get(1), a.len()) {
                (Some("uuid"), Some(Json::String(u)), 2) => Ok(Atom::Uuid(Uuid::parse(u)?)),
                (Some("named-uuid"), Some(Json::String(n)), 2) => Ok(Atom::NamedUuid(n.clone())),
                _ => Err(Error::Protocol(format!("not an atom: {j}"))),
            },
            _ => Err(Error::Protocol(format!("not an atom: {j}"))),
        }
    }
}

impl From<&str> for Atom {
    fn from(s: &str) -> Self {
        Atom::String(s.to_owned())
    }
}
impl From<String> for Atom {
    fn from(s: String) -> Self {
        Atom::String(s)
    }
}
impl From<i64> for Atom {
    fn from(i: i64) -> Self {
        Atom::Integer(i)
    }
}
impl From<bool> for Atom {
    fn from(b: bool) -> Self {
        Atom::Boolean(b)
    }
}
impl From<Uuid> for Atom {
    fn from(u: Uuid) -> Self {
        Atom::Uuid(u)
    }
}

/// A column value: an atom, a set of atoms, or a map from atoms to atoms.
///
/// A set of exactly one element and a bare atom mean the same; [`Value::set`] and
/// [`Value::atoms`] treat them alike.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A single atom (also a one-element set, or an optional value that is present).
    Atom(Atom),
    /// A set (an empty set is an absent optional value).
    Set(Vec<Atom>),
    /// A map, with keys kept in order.
    Map(Vec<(Atom, Atom)>),
}

impl Value {
    /// A set of atoms.
    pub fn set(atoms: impl IntoIterator<Item = Atom>) -> Self {
        Value::Set(atoms.into_iter().collect())
    }

    /// A map from string keys to string values.
    pub fn string_map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Atom::from(k), Atom::from(v)))
                .collect(),
        )
    }

    /// The atoms of an atom or set value (empty for a map).
    pub fn atoms(&self) -> &[Atom] {
        match self {
            Value::Atom(a) => std::slice::from_ref(a),
            Value::Set(s) => s,
            Value::Map(_) => &[],
        }
    }

    /// The one atom of an atom or one-element set.
    pub fn atom(&self) -> Option<&Atom> {
        match self.atoms() {
            [a] => Some(a),
            _ => None,
        }
    }

    /// The pairs of a map value (empty otherwise).
    pub fn pairs(&self) -> &[(Atom, Atom)] {
        match self {
            Value::Map(m) => m,
            _ => &[],
        }
    }

    /// A string-to-string map as a `BTreeMap` (other pairs are left out).
    pub fn as_string_map(&self) -> BTreeMap<String, String> {
        self.pairs()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
            .collect()
    }

    /// JSON notation.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Atom(a) => a.to_json(),
            Value::Set(s) => json!(["set", s.iter().map(Atom::to_json).collect::<Vec<_>>()]),
            Value::Map(m) => json!([
                "map",
                m.iter()
                    .map(|(k, v)| json!([k.to_json(), v.to_json()]))
                    .collect::<Vec<_>>()
            ]),
        }
    }

    /// Parses JSON notation.
    pub fn from_json(j: &Json) -> Result<Self, Error> {
        if let Json::Array(a) = j {
            match (a.first().and_then(Json::as_str), a.get(1), a.len()) {
                (Some("set"), Some(Json::Array(items)), 2) => {
                    return items
                        .iter()
                        .map(Atom::from_json)
                        .collect::<Result<_, _>>()
                        .map(Value::Set);
                }
                (Some("map"), Some(Json::Array(pairs)), 2) => {
                    return pairs
                        .iter()
                        .map(|p| match p.as_array().map(Vec::as_slice) {
                            Some([k, v]) => Ok((Atom::from_json(k)?, Atom::from_json(v)?)),
                            _ => Err(Error::Protocol(format!("bad map pair {p}"))),
                        })
                        .collect::<Result<_, _>>()
                        .map(Value::Map);
                }
                _ => {}
            }
        }
        Atom::from_json(j).map(Value::Atom)
    }

    /// Applies an `update2` "modify" diff (ovsdb-server(7)) to a column of `kind`: a
    /// scalar or optional value takes the diff as its new value; a set toggles the diff's
    /// elements; a map removes a key whose pair has its current value, replaces one with
    /// another value and adds an absent one.
    pub fn apply_diff(&mut self, diff: &Value, kind: ColumnKind) {
        match kind {
            ColumnKind::Scalar => *self = diff.clone(),
            ColumnKind::Set => {
                let mut atoms = self.atoms().to_vec();
                for a in diff.atoms() {
                    match atoms.iter().position(|o| o == a) {
                        Some(i) => {
                            atoms.remove(i);
                        }
                        None => atoms.push(a.clone()),
                    }
                }
                *self = Value::Set(atoms);
            }
            ColumnKind::Map => {
                let Value::Map(d) = diff else {
                    *self = diff.clone();
                    return;
                };
                if !matches!(self, Value::Map(_)) {
                    *self = Value::Map(Vec::new());
                }
                let Value::Map(old) = self else {
                    unreachable!("made a map above")
                };
                for (k, v) in d {
                    match old.iter().position(|(ok, _)| ok == k) {
                        Some(i) if &old[i].1 == v => {
                            old.remove(i);
                        }
                        Some(i) => old[i].1 = v.clone(),
                        None => old.push((k.clone(), v.clone())),
                    }
                }
            }
        }
    }
}

impl From<Atom> for Value {
    fn from(a: Atom) -> Self {
        Value::Atom(a)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Atom(s.into())
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Atom(i.into())
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Atom(b.into())
    }
}
impl From<Uuid> for Value {
    fn from(u: Uuid) -> Self {
        Value::Atom(u.into())
    }
}

/// Reads OVSDB's JSON notation straight from the parser (RFC 7047 §5.1), without a JSON tree:
/// a string, number or boolean is an atom; `["uuid", U]` and `["named-uuid", N]` are atoms;
/// `["set", [...]]` and `["map", [[k, v], ...]]` are sets and maps.
impl<'de> serde::Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NotationVisitor)
    }
}

impl<'de> serde::Deserialize<'de> for Atom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(NotationVisitor)? {
            Value::Atom(atom) => Ok(atom),
            _ => Err(serde::de::Error::custom(
                "a set or map where an atom belongs",
            )),
        }
    }
}

struct NotationVisitor;

impl<'de> serde::de::Visitor<'de> for NotationVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an OVSDB atom, set or map")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Atom(Atom::Boolean(b)))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Atom(Atom::Integer(i)))
    }
    fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Value, E> {
        i64::try_from(u)
            .map(|i| Value::Atom(Atom::Integer(i)))
            .map_err(|_| E::custom(format!("integer {u} out of range")))
    }
    fn visit_f64<E>(self, r: f64) -> Result<Value, E> {
        Ok(Value::Atom(Atom::Real(r)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Atom(Atom::String(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::Atom(Atom::String(s)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        use serde::de::Error as _;
        let tag: String = seq
            .next_element()?
            .ok_or_else(|| A::Error::custom("empty array"))?;
        let value = match tag.as_str() {
            "uuid" => {
                let u: String = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::custom("uuid without its value"))?;
                Value::Atom(Atom::Uuid(Uuid::parse(&u).map_err(A::Error::custom)?))
            }
            "named-uuid" => Value::Atom(Atom::NamedUuid(
                seq.next_element()?
                    .ok_or_else(|| A::Error::custom("named-uuid without its name"))?,
            )),
            "set" => Value::Set(
                seq.next_element()?
                    .ok_or_else(|| A::Error::custom("set without its elements"))?,
            ),
            "map" => {
                let pairs: Vec<(Atom, Atom)> = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::custom("map without its pairs"))?;
                Value::Map(pairs)
            }
            other => return Err(A::Error::custom(format!("not an atom: [{other:?}, ...]"))),
        };
        if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            return Err(A::Error::custom(format!(
                "{tag} with more than one operand"
            )));
        }
        Ok(value)
    }
}

/// A row: column name → value.
pub type Row = BTreeMap<String, Value>;

/// Parses a JSON row object.
pub fn row_from_json(j: &Json) -> Result<Row, Error> {
    let obj = j
        .as_object()
        .ok_or_else(|| Error::Protocol(format!("row is not an object: {j}")))?;
    obj.iter()
        .map(|(k, v)| Ok((k.clone(), Value::from_json(v)?)))
        .collect()
}

/// JSON object for a row.
pub fn row_to_json(row: &Row) -> Json {
    Json::Object(row.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips() {
        let values = [
            Value::from("x"),
            Value::from(42),
            Value::from(true),
            Value::from(Uuid::parse("5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7").unwrap()),
            Value::set([Atom::from("a"), Atom::from("b")]),
            Value::Set(vec![]),
            Value::string_map([("vip", "10.0.0.1:80"), ("protocol", "tcp")]),
        ];
        for v in values {
            assert_eq!(Value::from_json(&v.to_json()).unwrap(), v);
        }
        assert_eq!(
            Value::from_json(&json!(["named-uuid", "row1"])).unwrap(),
            Value::Atom(Atom::NamedUuid("row1".into()))
        );
        assert!(Value::from_json(&json!(["uuid", "nope"])).is_err());
        assert!(Value::from_json(&json!({"a": 1})).is_err());
    }

    #[test]
    fn uuids_round_trip_through_numbers_in_order() {
        let a = Uuid::parse("5B3CFB03-2143-4e8a-9067-dac1ef7ec6d7").unwrap();
        let b = Uuid::parse("5b3cfb03-2143-4e8a-9067-dac1ef7ec6d8").unwrap();
        assert_eq!(Uuid::from_u128(a.as_u128()), a);
        assert!(a.as_u128() < b.as_u128() && a < b);
        assert_eq!(Uuid::from_u128(1).0, "00000000-0000-0000-0000-000000000001");
        for bad in [
            "",
            "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d",
            "5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7a",
            "5b3cfb03x2143-4e8a-9067-dac1ef7ec6d7",
            "5b3cfb03-2143-4e8a-9067-dac1ef7ec6g7",
            "5b3cfb03-2143-4e8a-9067-dac1ef7ec6-7",
        ] {
            assert!(Uuid::parse(bad).is_err(), "{bad:?}");
            assert_eq!(Uuid::number_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_notation_reads_the_same_from_the_parser_as_from_a_tree() {
        let texts = [
            r#""x""#,
            "42",
            "-7",
            "1.5",
            "true",
            r#"["uuid","5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7"]"#,
            r#"["named-uuid","row1"]"#,
            r#"["set",[]]"#,
            r#"["set",["a",1,["uuid","5b3cfb03-2143-4e8a-9067-dac1ef7ec6d7"]]]"#,
            r#"["map",[["vip","10.0.0.1:80"],[1,true]]]"#,
        ];
        for text in texts {
            let tree = Value::from_json(&serde_json::from_str(text).unwrap()).unwrap();
            let direct: Value = serde_json::from_str(text).unwrap();
            assert_eq!(direct, tree, "{text}");
        }
        for bad in [
            r#"{"a":1}"#,
            "[]",
            r#"["uuid","nope"]"#,
            r#"["set",[["set",[]]]]"#,
            r#"["map",[["k"]]]"#,
            r#"["map",[],1]"#,
            r#"["bag",[]]"#,
            "18446744073709551615",
            // Beyond i64, not a real either (found by the ovsdb_values fuzz target: the
            // tree parser took it as a real).
            "10222210222222222222",
        ] {
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
            let tree: Json = serde_json::from_str(bad).unwrap();
            assert!(Value::from_json(&tree).is_err(), "{bad}, from a tree");
        }
    }

    #[test]
    fn diffs_toggle_set_elements_and_patch_maps() {
        let mut set = Value::set([Atom::from("a"), Atom::from("b")]);
        set.apply_diff(
            &Value::set([Atom::from("b"), Atom::from("c")]),
            ColumnKind::Set,
        );
        assert_eq!(set, Value::set([Atom::from("a"), Atom::from("c")]));
        // A set of one comes as its atom; a diff of one element is an atom too.
        let mut set = Value::from("a");
        set.apply_diff(&Value::from("b"), ColumnKind::Set);
        assert_eq!(set, Value::set([Atom::from("a"), Atom::from("b")]));
        let mut map = Value::string_map([("k1", "v1"), ("k2", "v2")]);
        map.apply_diff(
            &Value::string_map([("k1", "v1"), ("k2", "new"), ("k3", "v3")]),
            ColumnKind::Map,
        );
        assert_eq!(map, Value::string_map([("k2", "new"), ("k3", "v3")]));
        let mut scalar = Value::from(1);
        scalar.apply_diff(&Value::from(2), ColumnKind::Scalar);
        assert_eq!(scalar, Value::from(2));
        // An optional value emptied comes as the empty set, its new value.
        let mut optional = Value::from("sctp");
        optional.apply_diff(&Value::set([]), ColumnKind::Scalar);
        assert_eq!(optional, Value::set([]));
    }
}
