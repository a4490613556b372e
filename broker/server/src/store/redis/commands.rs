//! Builders of the commands the store sends.

use super::*;

/// Create a shared group's stream and group (made if missing, an existing
/// one kept).
pub(super) fn group_create(full: &str) -> Cmd {
    eval(&LUA_GROUP_CREATE, &[&keys::share(full)])
        .arg(keys::GROUP)
        .clone()
}

/// A command on one key with one more argument (`SADD key member`, ...).
pub(super) fn on_key(name: &str, key: &str, arg: &[u8]) -> Cmd {
    redis::cmd(name).arg(key).arg(arg).clone()
}

/// Drop a stream's entries older than `id` (never `id` itself).
pub(super) fn trim_before(key: &str, id: &str) -> Cmd {
    redis::cmd("XTRIM").arg(key).arg("MINID").arg(id).clone()
}

/// A session script: KEYS[1] the session hash, KEYS[2] its stream (one
/// slot: they share the client id's hash tag).
pub(super) fn session_eval(script: &Lua, client_id: &str) -> Cmd {
    eval(
        script,
        &[&keys::session(client_id), &keys::queue(client_id)],
    )
}

pub(super) fn eval(script: &Lua, keys: &[&str]) -> Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(script.hash()).arg(keys.len());
    for k in keys {
        c.arg(*k);
    }
    c
}

pub(super) fn xack(key: &str, id: &str) -> Cmd {
    redis::cmd("XACK").arg(key).arg(keys::GROUP).arg(id).clone()
}

pub(super) fn del_consumer(full: &str, consumer: &str) -> Cmd {
    eval(&LUA_DELCONSUMER, &[&keys::share(full)])
        .arg(keys::GROUP)
        .arg(consumer)
        .clone()
}

pub(super) fn xread(key: &str, after: &str) -> Cmd {
    redis::cmd("XREAD")
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(1000)
        .arg("STREAMS")
        .arg(key)
        .arg(after)
        .clone()
}
