//! Reading Redis replies of either protocol version without ever panicking.

use super::*;

/// The reply of [`LUA_RELEASE`].
pub(super) struct Released {
    /// 0: not this owner's any more; 1: offline; 2: ended.
    pub(super) code: i64,
    /// When the offline session expires (Redis time, ms; 0: never).
    pub(super) expires_at: i64,
    /// A will to publish now (taken out of Redis).
    pub(super) will: Option<Bytes>,
    /// When the delayed will is due (Redis time, ms; 0: none).
    pub(super) will_due: i64,
}

impl Released {
    pub(super) fn from_reply(v: Option<&Value>) -> Released {
        let a = v.and_then(as_array).unwrap_or_default();
        let int = |i: usize| a.get(i).and_then(as_int).unwrap_or(0);
        Released {
            code: int(0),
            expires_at: int(1),
            will: val_bytes(a.get(2)).filter(|b| !b.is_empty()),
            will_due: int(3),
        }
    }
}

pub(super) fn as_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::Okay => Some(b"OK"),
        _ => None,
    }
}

pub(super) fn as_str(v: &Value) -> Option<&str> {
    as_bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

/// The strings of an array reply (members, keys, ids); others are skipped.
pub(super) fn str_list(v: Option<&Value>) -> Vec<&str> {
    v.and_then(as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(as_str)
        .collect()
}

pub(super) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => as_str(other).and_then(|s| s.parse().ok()),
    }
}

pub(super) fn as_array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// Field/value pairs of a hash or a stream entry, in either RESP shape.
pub(super) fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        other => as_array(other)
            .map(|a| a.chunks_exact(2).map(|c| (&c[0], &c[1])).collect())
            .unwrap_or_default(),
    }
}

/// One stream entry: id and fields, borrowed from the reply (an inbox entry
/// carries a batch of up to 2,048 messages: it is read in place, not
/// copied into a map).
pub(super) struct Entry<'a> {
    pub(super) id: &'a str,
    pub(super) fields: Vec<(&'a [u8], &'a Value)>,
}

impl<'a> Entry<'a> {
    pub(super) fn field(&self, name: &str) -> Option<&'a Value> {
        self.fields
            .iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| *v)
    }

    /// An entry of one of the `redis` crate's typed stream replies.
    pub(super) fn of(e: &'a redis::streams::StreamId) -> Entry<'a> {
        Entry {
            id: &e.id,
            fields: e.map.iter().map(|(k, v)| (k.as_bytes(), v)).collect(),
        }
    }
}

pub(super) fn entries(v: &Value) -> Vec<Entry<'_>> {
    as_array(v)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let a = as_array(e)?;
            Some(Entry {
                id: as_str(a.first()?)?,
                fields: pairs(a.get(1)?)
                    .into_iter()
                    .filter_map(|(k, v)| Some((as_bytes(k)?, v)))
                    .collect(),
            })
        })
        .collect()
}

/// A reply as one of the `redis` crate's typed replies (`XINFO`,
/// `XPENDING`, `XAUTOCLAIM`); `None` (logged) when its shape is not the
/// expected one.
pub(super) fn typed<T: redis::FromRedisValue>(what: &str, v: &Value) -> Option<T> {
    match redis::from_redis_value_ref(v) {
        Ok(t) => Some(t),
        Err(e) => {
            debug!(reply = what, error = %e, "unexpected reply");
            None
        }
    }
}

/// XREAD/XREADGROUP reply → (stream key, entries).
pub(super) fn streams(v: &Value) -> Vec<(&str, Vec<Entry<'_>>)> {
    match v {
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((as_str(k)?, entries(v))))
            .collect(),
        other => as_array(other)
            .unwrap_or_default()
            .iter()
            .filter_map(|s| {
                let a = as_array(s)?;
                Some((as_str(a.first()?)?, entries(a.get(1)?)))
            })
            .collect(),
    }
}

pub(super) fn val_bytes(v: Option<&Value>) -> Option<Bytes> {
    v.and_then(as_bytes).map(Bytes::copy_from_slice)
}

/// The first error reply of a pipeline, as an error.
pub(super) fn check_all(replies: &[Value]) -> Result<(), StoreError> {
    match replies.iter().find_map(|v| match v {
        Value::ServerError(e) => Some(e),
        _ => None,
    }) {
        Some(e) => Err(StoreError::Server(e.code().to_string())),
        None => Ok(()),
    }
}
