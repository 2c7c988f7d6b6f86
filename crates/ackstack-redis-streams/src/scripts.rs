//! The Lua scripts behind every step that must be one atomic change in Redis: a delayed copy
//! written with its original's `XACK`, a dead letter added with its original's `XACK`, a
//! lease renewed only by its holder, crashed consumers' entries reclaimed with their
//! delivery counts, and due copies moved back to the stream.
//!
//! Each runs with `EVALSHA` (redis-rs loads it again after `NOSCRIPT`). The settling
//! scripts first check that the entry is still pending for this consumer with the delivery
//! count it was handed out with (`XPENDING`; a takeover, even by a consumer of the same name,
//! raises the count): `0` when it is no longer pending but still in the stream (settled
//! already), `-1` when it was taken over (the lease was lost), `1` when done. An entry that
//! is neither pending nor in the stream any more was trimmed while it ran: the copy is
//! written all the same (a possible duplicate rather than a loss), and a renewal has nothing
//! to renew.

use redis::Script;

/// Milliseconds of Redis's own clock (`TIME`), shared by every consumer.
const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// The holder check: `KEYS[1]` stream, `ARGV[1]` group, `ARGV[2]` consumer, `ARGV[3]` id,
/// `ARGV[4]` the delivery count it was handed out with. Sets `trimmed` when the entry is
/// neither pending nor in the stream.
const HELD: &str = "local trimmed = false
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] then
  if #redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3]) > 0 then return 0 end
  trimmed = true
elseif p[1][2] ~= ARGV[2] or tonumber(p[1][4]) ~= tonumber(ARGV[4]) then
  return -1
end
";

/// The scripts, each built once per source.
#[derive(Debug)]
pub(crate) struct Scripts {
    /// `KEYS[1]` stream; `ARGV` group, consumer, min idle ms, cursor, count. Answers
    /// `[next cursor, [[id, fields, delivery count], ...], entries gone]`.
    pub(crate) reclaim: Script,
    /// `KEYS[1]` stream, `KEYS[2]` delayed set; `ARGV[1]` most copies to move. Answers
    /// `[moved, ms until the next copy is due or -1]`. Moves nothing while the stream does
    /// not exist (deleted: the copies wait rather than recreate it without its group).
    pub(crate) move_due: Script,
    /// `KEYS[1]` stream, `KEYS[2]` delayed set; `ARGV` group, consumer, id, delivery count,
    /// delay ms, fields...
    /// The copy's fields are a list under `<delayed>:<id>`, due at Redis's time plus the delay.
    pub(crate) delay: Script,
    /// `KEYS[1]` stream, `KEYS[2]` dead-letter stream; `ARGV` group, consumer, id, delivery
    /// count, fields...
    pub(crate) dead_letter: Script,
    /// `KEYS[1]` stream; `ARGV` group, consumer, id, delivery count, idle ms, retry count.
    /// `XCLAIM` to itself with that idle time, `RETRYCOUNT` and `JUSTID`: idle 0 and the same
    /// count renew the lease; a long idle time hands the entry to the next consumer's
    /// `XAUTOCLAIM` (a release), with the count lowered by one where the delivery never ran,
    /// so that the takeover's increment leaves its attempt as it was.
    pub(crate) claim: Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        let reclaim = "local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if p[1] then n = p[1][4] end
    table.insert(out, {e[1], e[2], n})
  end
end
local gone = 0
if r[3] then gone = #r[3] end
return {r[1], out, gone}";
        let move_due = format!(
            "if redis.call('EXISTS', KEYS[1]) == 0 then return {{0, -1}} end
{NOW}local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  local list = KEYS[2] .. ':' .. id
  local fields = redis.call('LRANGE', list, 0, -1)
  if #fields >= 2 then redis.call('XADD', KEYS[1], '*', unpack(fields)) end
  redis.call('DEL', list)
  redis.call('ZREM', KEYS[2], id)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, math.ceil(tonumber(nxt[2]) - now)) end
return {{#due, wait}}"
        );
        let delay = format!(
            "{HELD}{NOW}local list = KEYS[2] .. ':' .. ARGV[3]
redis.call('DEL', list)
redis.call('RPUSH', list, unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1"
        );
        let dead_letter = format!(
            "{HELD}redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1"
        );
        let claim = format!(
            "{HELD}if trimmed then return 1 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[5], 'RETRYCOUNT', ARGV[6], 'JUSTID')
return 1"
        );
        Scripts {
            reclaim: Script::new(reclaim),
            move_due: Script::new(&move_due),
            delay: Script::new(&delay),
            dead_letter: Script::new(&dead_letter),
            claim: Script::new(&claim),
        }
    }
}
