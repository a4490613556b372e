//! The Lua scripts: each touches the keys of one slot.

use std::sync::OnceLock;

/// A Lua script. Sent as `EVALSHA` (Redis hashes a script sent as `EVAL`
/// on every call); a Redis that lost its script cache (restarted, failed
/// over) answers NOSCRIPT, and the command is sent again as `EVAL`, which
/// caches it (see `client.rs`).
pub(super) struct Lua {
    pub(super) body: &'static str,
    hash: OnceLock<String>,
}

impl Lua {
    const fn new(body: &'static str) -> Lua {
        Lua {
            body,
            hash: OnceLock::new(),
        }
    }

    /// The SHA1 Redis knows the script by.
    pub(super) fn hash(&self) -> &str {
        self.hash
            .get_or_init(|| redis::Script::new(self.body).get_hash().to_owned())
    }
}

/// The script a hash names, to send it as `EVAL`.
pub(super) fn script_of(hash: &[u8]) -> Option<&'static Lua> {
    ALL.iter().copied().find(|l| l.hash().as_bytes() == hash)
}

/// Append to a session's stream. ARGV: the cap, the message, the pod the
/// caller believes serves the session (or ''). Returns 1 when appended and
/// that belief was right, else `{code, owner}`: code -1 when the session is
/// gone, 0 when its stream is full (a counted drop), 1 when appended;
/// `owner` is the pod serving the session now, to be woken.
pub(super) static LUA_ENQUEUE: Lua = Lua::new(
    r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {-1, ''} end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[1]) then return {0, owner} end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
if owner == ARGV[3] then return 1 end
return {1, owner}",
);

/// Scripts that need the time read it from Redis (`TIME`): every pod
/// agrees on it, whatever its own clock says.
macro_rules! lua_timed {
    ($body:literal) => {
        concat!(
            "local function now_ms()\n",
            "  local t = redis.call('TIME')\n",
            "  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            "end\n",
            $body
        )
    };
}

/// Take a session over (a takeover always wins, as MQTT says): returns the
/// previous owner and its epoch, so that the kick names that connection.
/// ARGV: node, epoch, clean start, expiry, will, will delay.
pub(super) static LUA_CLAIM: Lua = Lua::new(
    r"
local prev = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
local present = redis.call('EXISTS', KEYS[1])
local old = {}
if ARGV[3] == '1' then
  if present == 1 then old = redis.call('HKEYS', KEYS[1]) end
  redis.call('DEL', KEYS[1], KEYS[2])
  present = 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'expiry', ARGV[4])
redis.call('HDEL', KEYS[1], 'expires_at', 'will_at')
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'will', ARGV[5], 'wdelay', ARGV[6])
else
  redis.call('HDEL', KEYS[1], 'will', 'wdelay')
end
return {prev[1] or '', prev[2] or '', present, old}",
);

/// Let go of a session, only if `owner`/`epoch` still hold it (epoch `*`:
/// any, for a dead pod's sessions). ARGV: node, epoch, persistent, expiry
/// seconds, PUBREL ids, keep will (1: a will with a delay is scheduled in
/// Redis; 0: the caller publishes or drops it). Returns `{code, expires_at,
/// will to publish now, will due at}`; code 0: not ours, 1: offline, 2:
/// ended. The will is taken out atomically: published once.
pub(super) static LUA_RELEASE: Lua = Lua::new(lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'will', 'wdelay')
if o[1] ~= ARGV[1] or (ARGV[2] ~= '*' and o[2] ~= ARGV[2]) then return {0, 0, '', 0} end
local will = o[3] or ''
local wdelay = tonumber(o[4] or '0') or 0
if ARGV[3] == '1' then
  local now = now_ms()
  local exp = tonumber(ARGV[4])
  local at = 0
  if exp < 4294967295 then at = now + exp * 1000 end
  redis.call('HSET', KEYS[1], 'owner', '', 'expires_at', at, 'rel', ARGV[5])
  if will ~= '' and ARGV[6] == '1' and wdelay > 0 then
    local due = now + math.min(wdelay, exp) * 1000
    redis.call('HSET', KEYS[1], 'will_at', due)
    return {1, at, '', due}
  end
  redis.call('HDEL', KEYS[1], 'will', 'wdelay')
  return {1, at, will, 0}
end
redis.call('DEL', KEYS[1], KEYS[2])
return {2, 0, will, 0}"
));

/// A delayed will whose time came: taken out (once) if the client is
/// still away; dropped if it came back.
pub(super) static LUA_FIRE_WILL: Lua = Lua::new(lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'will', 'will_at')
if not o[3] then return '' end
if o[1] and o[1] ~= '' then
  redis.call('HDEL', KEYS[1], 'will_at')
  return ''
end
if tonumber(o[3]) > now_ms() then return '' end
redis.call('HDEL', KEYS[1], 'will', 'wdelay', 'will_at')
return o[2] or ''"
));

/// An outgoing QoS 2 message was received (PUBREC): its entry goes, and
/// its packet id is recorded as awaiting PUBCOMP (`r:{id}`), in one step —
/// only while this connection still holds the session, so a pod that takes
/// it over either finds the id recorded or the message still there.
/// KEYS: session, stream; ARGV: entry id, packet id, node, epoch.
pub(super) static LUA_DELIVERED: Lua = Lua::new(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if o[1] ~= ARGV[3] or o[2] ~= ARGV[4] then return redis.error_reply('NOTOWNER taken over') end
redis.call('XDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'r:' .. ARGV[2], 1)
return 1",
);

/// Re-take a session after Redis lost it or this pod was declared dead.
pub(super) static LUA_RECLAIM: Lua = Lua::new(
    r"
local o = redis.call('HGET', KEYS[1], 'owner')
if o and o ~= '' and o ~= ARGV[1] then return 0 end
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', ARGV[2], 'expiry', ARGV[3])
redis.call('HDEL', KEYS[1], 'expires_at', 'will_at')
return 1 + existed",
);

/// End an offline session whose expiry passed: `{1, fields, will}`.
pub(super) static LUA_EXPIRE: Lua = Lua::new(lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'expires_at', 'will')
if o[1] and o[1] ~= '' then return {0} end
local at = tonumber(o[2] or '')
if at and (at == 0 or at > now_ms()) then return {0} end
local f = redis.call('HKEYS', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
return {1, f, o[3] or ''}"
));

/// Heartbeat by Redis's clock: `-1` when this pod was not registered
/// (Redis lost it, or it was declared dead), else the milliseconds since
/// its previous heartbeat, by the same clock. A gap over half the node
/// timeout (Redis or this pod was paused) marks the pod unsteady from now
/// (`steady` hash): it declares nobody dead for a node timeout, so that
/// every live pod has had its turn to beat. KEYS: nodes, steady; ARGV:
/// node, node timeout (ms).
pub(super) static LUA_HEARTBEAT: Lua = Lua::new(lua_timed!(
    r"
local now = now_ms()
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
if not prev then
  redis.call('HSET', KEYS[2], ARGV[1], now)
  return -1
end
local gap = now - tonumber(prev)
if gap > tonumber(ARGV[2]) / 2 then redis.call('HSET', KEYS[2], ARGV[1], now) end
return gap"
));

/// This pod's connection count in, the counts of the live pods out (pods
/// whose heartbeat is older than the node timeout are dropped from the
/// hash). KEYS: nodes, load; ARGV: node, count (or `since`: the Redis time
/// of the first call, kept), node timeout (ms).
pub(super) static LUA_LOAD: Lua = Lua::new(lua_timed!(
    r"
local now = now_ms()
if ARGV[2] == 'since' then
  redis.call('HSETNX', KEYS[2], ARGV[1], string.format('%d', now))
else
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
local all = redis.call('HGETALL', KEYS[2])
local out = {}
for i = 1, #all, 2 do
  local beat = redis.call('ZSCORE', KEYS[1], all[i])
  if beat and now - tonumber(beat) <= tonumber(ARGV[3]) then
    out[#out + 1] = tonumber(all[i + 1])
  else
    redis.call('HDEL', KEYS[2], all[i])
  end
end
return out"
));

/// This pod's template revision in (kept with the Redis time it was first
/// written), the live pods' out after the time now:
/// `[now, node, "<since> <revision>", draining since (or "")]` each
/// (entries of pods whose heartbeat is older than the node timeout are
/// dropped). KEYS: nodes, revisions, draining; ARGV: node, revision, node
/// timeout (ms).
pub(super) static LUA_REVISIONS: Lua = Lua::new(lua_timed!(
    r"
local now = now_ms()
local cur = redis.call('HGET', KEYS[2], ARGV[1])
if not cur or string.sub(cur, string.find(cur, ' ') + 1) ~= ARGV[2] then
  redis.call('HSET', KEYS[2], ARGV[1], string.format('%d', now) .. ' ' .. ARGV[2])
end
local all = redis.call('HGETALL', KEYS[2])
local out = {string.format('%d', now)}
for i = 1, #all, 2 do
  local beat = redis.call('ZSCORE', KEYS[1], all[i])
  if all[i] == ARGV[1] or (beat and now - tonumber(beat) <= tonumber(ARGV[3])) then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
    out[#out + 1] = redis.call('HGET', KEYS[3], all[i]) or ''
  else
    redis.call('HDEL', KEYS[2], all[i])
  end
end
return out"
));

/// Pods whose heartbeat is older than the node timeout — asked by a pod
/// whose own heartbeats are fresh and have been steady for a node timeout,
/// all by Redis's clock (a sweep sent before an outage and run after it
/// finds nobody). KEYS: nodes, steady; ARGV: node timeout (ms), limit, node.
pub(super) static LUA_DEAD: Lua = Lua::new(lua_timed!(
    r"
local now = now_ms()
local t = tonumber(ARGV[1])
local mine = redis.call('ZSCORE', KEYS[1], ARGV[3])
if not mine or now - tonumber(mine) > t / 2 then return {} end
local since = redis.call('HGET', KEYS[2], ARGV[3])
if not since or now - tonumber(since) < t then return {} end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - t, 'LIMIT', 0, tonumber(ARGV[2]))"
));

/// Members of a time-scored set that are due (score <= now), at most
/// ARGV[1].
pub(super) static LUA_DUE: Lua = Lua::new(lua_timed!(
    r"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))"
));

/// Create a shared group's stream and group; one that exists is fine.
pub(super) static LUA_GROUP_CREATE: Lua = Lua::new(
    r"
local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then
  return redis.error_reply(r.err)
end
return 1",
);

/// Release a dead pod's session (any epoch): [`LUA_RELEASE`] with the
/// session's own expiry, a delayed will scheduled. ARGV[1]: the dead pod.
pub(super) static LUA_RELEASE_DEAD: Lua = Lua::new(lua_timed!(
    r"
local o = redis.call('HMGET', KEYS[1], 'owner', 'expiry', 'will', 'wdelay')
if o[1] ~= ARGV[1] then return {0, 0, '', 0} end
local exp = tonumber(o[2] or '0') or 0
local will = o[3] or ''
local wdelay = tonumber(o[4] or '0') or 0
if exp > 0 then
  local now = now_ms()
  local at = 0
  if exp < 4294967295 then at = now + exp * 1000 end
  redis.call('HSET', KEYS[1], 'owner', '', 'expires_at', at)
  if will ~= '' and wdelay > 0 then
    local due = now + math.min(wdelay, exp) * 1000
    redis.call('HSET', KEYS[1], 'will_at', due)
    return {1, at, '', due}
  end
  redis.call('HDEL', KEYS[1], 'will', 'wdelay')
  return {1, at, will, 0}
end
redis.call('DEL', KEYS[1], KEYS[2])
return {2, 0, will, 0}"
));

/// Extend a lock only while this pod holds it.
pub(super) static LUA_RENEW: Lua = Lua::new(
    r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
);

/// Remove a consumer from a shared group only when it holds no pending
/// entry (`XGROUP DELCONSUMER` would drop them): KEYS[1] the stream,
/// ARGV[1] the group, ARGV[2] the consumer.
pub(super) static LUA_DELCONSUMER: Lua = Lua::new(
    r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])",
);

/// Every script, for [`script_of`].
static ALL: [&Lua; 16] = [
    &LUA_ENQUEUE,
    &LUA_CLAIM,
    &LUA_RELEASE,
    &LUA_FIRE_WILL,
    &LUA_DELIVERED,
    &LUA_RECLAIM,
    &LUA_EXPIRE,
    &LUA_HEARTBEAT,
    &LUA_LOAD,
    &LUA_REVISIONS,
    &LUA_DEAD,
    &LUA_DUE,
    &LUA_GROUP_CREATE,
    &LUA_RELEASE_DEAD,
    &LUA_RENEW,
    &LUA_DELCONSUMER,
];
