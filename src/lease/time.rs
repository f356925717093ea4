//! Timestamps in lease objects (docs/ARCHITECTURE.md §3 "Lease, roles and
//! fencing"; the module docs of [`crate::lease`], "Time"): read leniently from
//! whatever the old tool or a person wrote, written as the old tool writes them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::Value;

/// A time as the lease, audit entries and the commands show it: RFC 3339 in
/// whole seconds, UTC.
pub(crate) fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A time as the old tool (Python) or a person may have written it: Unix
/// seconds (integer or fractional, possibly as a string) or RFC 3339.
pub fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    fn from_f64(f: f64) -> Option<DateTime<Utc>> {
        if !f.is_finite() {
            return None;
        }
        let secs = f.floor();
        let nanos = ((f - secs) * 1e9).round().min(999_999_999.0) as u32;
        DateTime::from_timestamp(secs as i64, nanos)
    }
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => DateTime::from_timestamp(i, 0),
            None => from_f64(n.as_f64()?),
        },
        Value::String(s) => {
            let s = s.trim();
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .ok()
                .or_else(|| s.parse::<f64>().ok().and_then(from_f64))
        }
        _ => None,
    }
}

fn time_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let v = Value::deserialize(d)?;
    parse_time(&v).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "expected Unix seconds or an RFC 3339 time, found {v}"
        ))
    })
}

/// Written as whole Unix seconds (the old tool's format); read leniently.
pub(super) mod unix_seconds {
    use chrono::{DateTime, Utc};

    pub fn serialize<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(t.timestamp())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        super::time_de(d)
    }
}

/// An optional [`rfc3339`] time.
pub(super) mod rfc3339_opt {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(
        t: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<serde_json::Value>::deserialize(d)? {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => super::parse_time(&v).map(Some).ok_or_else(|| {
                serde::de::Error::custom(format!("expected an RFC 3339 time, found {v}"))
            }),
        }
    }
}

/// Written as RFC 3339 (heartbeats, hand-over requests); read leniently.
pub(super) mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};

    pub fn serialize<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        super::time_de(d)
    }
}
