//! Shared subscriptions: one stream and consumer group per `$share/{group}/{filter}`.

use redis::streams::{
    StreamAutoClaimReply, StreamInfoConsumersReply, StreamInfoGroupsReply, StreamPendingReply,
};

use super::*;

impl RedisStore {
    /// Read the shared-subscription streams this pod has members for.
    pub(super) async fn share_reader(self: Arc<Self>) {
        let mut con = None;
        let mut last_claim = Instant::now();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            // Only groups with a member online here: the others' entries
            // stay unread for the pods that can deliver them.
            let keys_now: Vec<ByteString> = self
                .shares
                .lock()
                .iter()
                .filter(|f| self.local.serves_share(f))
                .cloned()
                .collect();
            if keys_now.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                continue;
            }
            if con.is_none() {
                con = self.blocking_conn().await;
                if con.is_none() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            let Some(c) = con.as_mut() else { continue };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(keys::GROUP)
                .arg(&*self.node)
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(100)
                .arg("STREAMS");
            for k in &keys_now {
                cmd.arg(keys::share(k));
            }
            for _ in &keys_now {
                cmd.arg(">");
            }
            let reply = tokio::select! {
                r = c.run(&cmd) => r,
                _ = self.shutdown.cancelled() => return,
            };
            match reply {
                Ok(v) => self.on_shared(&keys_now, &v).await,
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // Redis lost the group (restart): make it again.
                        self.ensure_groups(&keys_now).await;
                    } else {
                        self.failed("shared read", &e);
                        con = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            if last_claim.elapsed() > Duration::from_secs(2) {
                last_claim = Instant::now();
                self.claim_abandoned(&keys_now).await;
            }
        }
    }

    pub(super) async fn ensure_groups(&self, fulls: &[ByteString]) {
        for f in fulls {
            let _ = self.query_cmds(vec![group_create(f)]).await;
        }
    }

    pub(super) async fn on_shared(&self, fulls: &[ByteString], reply: &Value) {
        let mut acks = Vec::new();
        for (key, list) in streams(reply) {
            let Some(full) = fulls.iter().find(|f| keys::share(f) == key) else {
                continue;
            };
            for e in list {
                if self.deliver_share_entry(full, &e) {
                    acks.push(xack(key, e.id));
                }
            }
        }
        self.run_later(acks);
    }

    /// Hand one entry of a shared group's stream to a member here. True
    /// when the entry can be acknowledged in the group now (QoS 0, or
    /// unreadable); a queued QoS 1/2 entry is acknowledged when the
    /// member's client has it, and one that found no member stays pending
    /// (claimed again once idle, here or on another pod).
    pub(super) fn deliver_share_entry(&self, full: &ByteString, e: &Entry<'_>) -> bool {
        let broker = &self.local;
        let id = ByteString::from(e.id);
        let Some(Ok((m, _))) = val_bytes(e.field("m")).map(wire::decode_message) else {
            warn!(filter = %full, "dropping an unreadable shared-group entry");
            return true;
        };
        let (m, span) = crate::trace::remote(m, "share");
        // Marked held first: the member's client may acknowledge it at once.
        let key = (full.clone(), id.clone());
        self.share_held.lock().insert(key.clone());
        let stored = span.in_scope(|| broker.deliver_shared(full, Arc::new(m), &id));
        if stored != Stored::Queued {
            self.share_held.lock().remove(&key);
        }
        stored == Stored::NotWanted
    }

    /// Entries of a shared group read by a pod that died (or by a member
    /// here that left) before its client acknowledged them go to a member
    /// here, once idle for the node timeout. Entries a client here still
    /// holds are left alone.
    pub(super) async fn claim_abandoned(&self, fulls: &[ByteString]) {
        let idle_ms = self.node_timeout.as_millis() as u64;
        let cmds = fulls
            .iter()
            .map(|f| {
                redis::cmd("XAUTOCLAIM")
                    .arg(keys::share(f))
                    .arg(keys::GROUP)
                    .arg(&*self.node)
                    .arg(idle_ms)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .clone()
            })
            .collect();
        let Ok(replies) = self.query_cmds(cmds).await else {
            return;
        };
        let mut acks = Vec::new();
        let mut trims = Vec::new();
        for (full, r) in fulls.iter().zip(&replies) {
            let key = keys::share(full);
            let Some(claimed) = typed::<StreamAutoClaimReply>("XAUTOCLAIM", r) else {
                continue;
            };
            for e in claimed.claimed.iter().map(Entry::of) {
                let held = self
                    .share_held
                    .lock()
                    .contains(&(full.clone(), ByteString::from(e.id)));
                if !held && self.deliver_share_entry(full, &e) {
                    acks.push(xack(&key, e.id));
                }
            }
            trims.push(key);
        }
        self.run_later(acks);
        self.trim_shares(trims).await;
    }

    /// Trim a share stream to what its group has not yet read or
    /// acknowledged; never past a pending entry.
    pub(super) async fn trim_shares(&self, keys_: Vec<String>) {
        for key in keys_ {
            let Ok(r) = self
                .query_cmds(vec![
                    redis::cmd("XINFO").arg("GROUPS").arg(&key).clone(),
                    redis::cmd("XPENDING").arg(&key).arg(keys::GROUP).clone(),
                    redis::cmd("XINFO")
                        .arg("CONSUMERS")
                        .arg(&key)
                        .arg(keys::GROUP)
                        .clone(),
                ])
                .await
            else {
                continue;
            };
            let [groups, pending, consumers] = &r[..] else {
                continue;
            };
            let (Some(groups), Some(pending), Some(consumers)) = (
                typed::<StreamInfoGroupsReply>("XINFO GROUPS", groups),
                typed::<StreamPendingReply>("XPENDING", pending),
                typed::<StreamInfoConsumersReply>("XINFO CONSUMERS", consumers),
            ) else {
                continue;
            };
            // Consumers of pods long gone (or idle) that hold nothing are
            // removed, so the group does not grow with every pod ever
            // started; a live pod's consumer comes back with its next read.
            let gone = consumers
                .consumers
                .iter()
                .filter(|c| c.pending == 0 && c.idle as i64 > CONSUMER_IDLE_MS)
                .filter(|c| c.name != *self.node)
                .filter_map(|c| {
                    let full = key.strip_prefix(keys::share("").as_str())?;
                    Some(del_consumer(full, &c.name))
                })
                .collect();
            self.run_later(gone);
            // Not past what the group has yet to read, nor past the first
            // entry read and not acknowledged.
            let mut min_id: Option<&str> = None;
            let unread = groups.groups.iter().map(|g| g.last_delivered_id.as_str());
            let first_pending = match &pending {
                StreamPendingReply::Data(d) => Some(d.start_id.as_str()),
                _ => None,
            };
            for id in unread.chain(first_pending) {
                if min_id.is_none_or(|m| stream_id_le(id, m)) {
                    min_id = Some(id);
                }
            }
            if let Some(id) = min_id {
                self.run_later(vec![trim_before(&key, id)]);
            }
        }
    }
}
