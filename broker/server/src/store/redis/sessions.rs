//! Sessions in Redis: claim and release, and the puller that feeds an online persistent session from its stream.

use super::*;

impl RedisStore {
    /// The client received an outgoing QoS 2 message of its stream (PUBREC):
    /// done once Redis let go of the entry and recorded the packet id as
    /// awaiting PUBCOMP; only then is PUBREL sent.
    pub fn delivered_qos2(
        &self,
        client_id: &ByteString,
        entry: &str,
        pid: cirrus_codec::PacketId,
        epoch: u64,
    ) -> Pending {
        let cmd = session_eval(&LUA_DELIVERED, client_id)
            .arg(entry)
            .arg(pid.get())
            .arg(&*self.node)
            .arg(epoch)
            .clone();
        let (tx, rx) = oneshot::channel();
        let op = Op::Cmds {
            cmds: vec![cmd],
            done: Some(tx),
        };
        self.pending(op, Some(rx))
    }

    /// PUBCOMP: the packet id of an outgoing QoS 2 message is free again.
    pub fn completed_qos2(&self, client_id: &ByteString, pid: cirrus_codec::PacketId) {
        self.run_later(vec![redis::cmd("HDEL")
            .arg(keys::session(client_id))
            .arg(format!("r:{}", pid.get()))
            .clone()]);
    }

    /// Take ownership of a client's session (creating or resetting it) and
    /// tell a previous owner on another pod to let its connection go.
    pub async fn claim(
        &self,
        client_id: &ByteString,
        clean_start: bool,
        expiry: u32,
        will: Option<&LastWill>,
        epoch: u64,
    ) -> Result<Claim, StoreError> {
        if !self.is_ready() {
            return Err(StoreError::NotReady);
        }
        let will_delay = will.map_or(0, |w| w.properties.will_delay_interval.unwrap_or(0));
        let will = will.map(|w| wire::encode_will(w, client_id));
        let skey = keys::session(client_id);
        let reply = self
            .query_cmds(vec![session_eval(&LUA_CLAIM, client_id)
                .arg(&*self.node)
                .arg(epoch)
                .arg(u8::from(clean_start))
                .arg(expiry)
                .arg(will.as_deref().unwrap_or_default())
                .arg(will_delay)
                .clone()])
            .await?;
        let r = reply
            .first()
            .and_then(as_array)
            .ok_or(StoreError::Reply("claim"))?;
        let prev_owner = r.first().and_then(as_str).unwrap_or_default();
        let present = r.get(2).and_then(as_int) == Some(1);
        let mut cmds = Vec::new();
        // A reset session's persistent subscriptions leave the table.
        if let Some(old) = r.get(3).and_then(as_array) {
            for f in old.iter().filter_map(as_str) {
                if let Some(filter) = f.strip_prefix("sub:") {
                    self.psub_remove_cmds(client_id, filter, &mut cmds);
                }
            }
        }
        cmds.push(
            redis::cmd("ZREM")
                .arg(keys::EXPIRY)
                .arg(&**client_id)
                .clone(),
        );
        cmds.push(
            redis::cmd("SADD")
                .arg(keys::node_sessions(&self.node))
                .arg(&**client_id)
                .clone(),
        );
        let prev_epoch = r.get(1).and_then(as_int).unwrap_or(0).max(0) as u64;
        if !prev_owner.is_empty() && prev_owner != &*self.node {
            debug!(client_id = %client_id, old = prev_owner, "taking the session over from another pod");
            // Never dropped, and aimed at that one connection: a kick that
            // arrives late cannot close a newer connection of the client.
            self.send_op(Op::Kick {
                node: Arc::from(prev_owner),
                client_id: client_id.clone(),
                epoch: prev_epoch,
            });
        }
        let mut claim = Claim {
            present,
            ..Claim::default()
        };
        if present {
            cmds.push(redis::cmd("HGETALL").arg(&skey).clone());
        }
        let n = cmds.len();
        let replies = self.query_cmds(cmds).await?;
        if present {
            let all = replies.get(n - 1).ok_or(StoreError::Reply("session"))?;
            for (k, v) in pairs(all) {
                let (Some(k), Some(v)) = (as_str(k), as_str(v)) else {
                    continue;
                };
                if let Some(filter) = k.strip_prefix("sub:") {
                    let (o, id) = wire::decode_sub(v)?;
                    claim.subs.push((ByteString::from(filter), o, id));
                } else if k == "rel" {
                    claim
                        .rel
                        .extend(v.split(',').filter_map(|p| p.parse::<u16>().ok()));
                } else if let Some(pid) = k.strip_prefix("r:").and_then(|p| p.parse().ok()) {
                    claim.rel.push(pid);
                } else if k == "hw" && !v.is_empty() {
                    claim.hw = Some(v.to_string());
                }
            }
        }
        debug!(client_id = %client_id, present = claim.present, rel = ?claim.rel, hw = ?claim.hw, "claimed");
        Ok(claim)
    }

    /// The connection of a session ended on this pod. `delayed_will`: the
    /// connection left a will with a delay, which Redis now keeps and a pod
    /// publishes when it is due (unless the client is back by then).
    pub async fn release(
        &self,
        client_id: &ByteString,
        epoch: u64,
        expiry: u32,
        rel: &[u16],
        delayed_will: bool,
    ) {
        self.stop_puller(client_id);
        let persistent = expiry > 0;
        let rel: Vec<String> = rel.iter().map(u16::to_string).collect();
        let reply = self
            .query_cmds(vec![session_eval(&LUA_RELEASE, client_id)
                .arg(&*self.node)
                .arg(epoch)
                .arg(u8::from(persistent))
                .arg(expiry)
                .arg(rel.join(","))
                .arg(u8::from(delayed_will))
                .clone()])
            .await;
        let Ok(reply) = reply else { return };
        let r = Released::from_reply(reply.first());
        debug!(client_id = %client_id, code = r.code, "released");
        let mut cmds = vec![redis::cmd("SREM")
            .arg(keys::node_sessions(&self.node))
            .arg(&**client_id)
            .clone()];
        if r.code == 1 {
            self.went_offline_cmds(client_id, &r, &mut cmds);
        }
        self.run_later(cmds);
    }

    /// A session went offline: into the expiry
    /// (and delayed-will) schedules.
    pub(super) fn went_offline_cmds(&self, client_id: &str, r: &Released, cmds: &mut Vec<Cmd>) {
        if r.expires_at > 0 {
            cmds.push(
                redis::cmd("ZADD")
                    .arg(keys::EXPIRY)
                    .arg(r.expires_at)
                    .arg(client_id)
                    .clone(),
            );
        }
        if r.will_due > 0 {
            cmds.push(
                redis::cmd("ZADD")
                    .arg(keys::WILLS)
                    .arg(r.will_due)
                    .arg(client_id)
                    .clone(),
            );
        }
    }

    /// Offline persistent sessions with an expiry, cluster-wide.
    pub async fn offline_sessions(&self) -> u64 {
        match self
            .query_cmds(vec![redis::cmd("ZCARD").arg(keys::EXPIRY).clone()])
            .await
        {
            Ok(r) => r.first().and_then(as_int).unwrap_or(0).max(0) as u64,
            Err(_) => 0,
        }
    }

    /// Feed an online persistent session from its stream until it leaves.
    /// `start`: the last entry already read (entries after it are new).
    pub fn start_puller(
        self: &Arc<Self>,
        session: Arc<Session>,
        epoch: u64,
        hw: Option<String>,
        start: Option<String>,
    ) {
        let p = Arc::new(Puller {
            wake: Notify::new(),
            cancel: CancellationToken::new(),
        });
        if let Some(old) = self
            .pullers
            .lock()
            .insert(session.client_id.clone(), p.clone())
        {
            old.cancel.cancel();
        }
        self.tasks
            .spawn(self.clone().pull(session, epoch, p, hw, start));
    }

    pub fn stop_puller(&self, client_id: &ByteString) {
        if let Some(p) = self.pullers.lock().remove(client_id) {
            p.cancel.cancel();
        }
    }

    pub(super) fn wake(&self, client_id: &str) {
        if let Some(p) = self.pullers.lock().get(client_id) {
            p.wake.notify_one();
        }
    }

    pub(super) async fn pull(
        self: Arc<Self>,
        session: Arc<Session>,
        epoch: u64,
        p: Arc<Puller>,
        hw: Option<String>,
        start: Option<String>,
    ) {
        let broker = &self.local;
        let qkey = keys::queue(&session.client_id);
        let mut last: Option<String> = start;
        loop {
            let room = {
                let st = session.state.lock();
                if st.ended || st.epoch != epoch {
                    return;
                }
                self.max_queued
                    .saturating_sub(st.queue.len() + st.inflight.len())
            };
            let mut got = 0;
            let mut full = false;
            if room > 0 {
                let from = match &last {
                    Some(id) => format!("({id}"),
                    None => "-".to_string(),
                };
                let reply = self
                    .query_cmds(vec![redis::cmd("XRANGE")
                        .arg(&qkey)
                        .arg(from)
                        .arg("+")
                        .arg("COUNT")
                        .arg(room.min(READ_COUNT))
                        .clone()])
                    .await;
                let Ok(reply) = reply else {
                    // Redis unreachable: try again (the supervisor tells
                    // when it is back; this read does not wait for that).
                    tokio::select! {
                        _ = p.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                };
                {
                    let list = reply.first().map(entries).unwrap_or_default();
                    if let Some(e) = list.last() {
                        // Entries read may have been sent: a later
                        // connection marks them DUP.
                        self.run_later(vec![redis::cmd("HSET")
                            .arg(keys::session(&session.client_id))
                            .arg("hw")
                            .arg(e.id)
                            .clone()]);
                    }
                    for e in list {
                        let id = ByteString::from(e.id);
                        let dup = hw.as_deref().is_some_and(|h| stream_id_le(&id, h));
                        let Some(b) = val_bytes(e.field("m")) else {
                            self.ack(&session.client_id, StoreAck::Session(id));
                            last = Some(e.id.to_string());
                            continue;
                        };
                        let stored = match wire::decode_message(b) {
                            Ok((m, _)) => {
                                let (m, span) = crate::trace::remote(m, "session");
                                span.in_scope(|| {
                                    broker.deliver_stored(&session, Arc::new(m), id.clone(), dup)
                                })
                            }
                            Err(err) => {
                                warn!(client_id = %session.client_id, error = %err, "dropping an unreadable stored message");
                                Stored::NotWanted
                            }
                        };
                        match stored {
                            Stored::Queued => {}
                            Stored::NotWanted => {
                                self.ack(&session.client_id, StoreAck::Session(id));
                            }
                            // The session ended here: what was read and not
                            // queued stays in the stream for the next owner.
                            Stored::Gone => return,
                            // Read it again once there is room.
                            Stored::Full => {
                                full = true;
                                break;
                            }
                        }
                        got += 1;
                        last = Some(e.id.to_string());
                    }
                }
            }
            if !full && got >= room.min(READ_COUNT) && got > 0 {
                continue;
            }
            // Publishers wake the owner of the session (Redis tells them
            // who it is): an idle session costs Redis nothing. A full queue
            // is looked at again shortly, as the client drains it.
            if room == 0 || full {
                tokio::select! {
                    _ = p.cancel.cancelled() => return,
                    _ = self.shutdown.cancelled() => return,
                    _ = p.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            } else {
                tokio::select! {
                    _ = p.cancel.cancelled() => return,
                    _ = self.shutdown.cancelled() => return,
                    _ = p.wake.notified() => {}
                }
            }
        }
    }
}
