//! Heartbeats by Redis time, dead pods, delayed wills, expiries, resync after an outage, leaving.

use super::*;

/// A live pod's template revision, from [`RedisStore::revisions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRevision {
    /// This pod.
    pub mine: bool,
    pub revision: String,
    /// When the pod first wrote this revision (Redis time, ms).
    pub since_ms: u64,
    /// For how long the pod has been draining (ms), if it is.
    pub draining_for_ms: Option<u64>,
}

impl RedisStore {
    /// One heartbeat, by Redis's clock. `Ok(None)`: this pod was not
    /// registered (Redis lost it, or the others declared it dead);
    /// `Ok(Some(gap))`: milliseconds since its previous heartbeat.
    pub(super) async fn heartbeat(&self) -> Result<Option<u64>, StoreError> {
        let r = self
            .query_cmds(vec![eval(&LUA_HEARTBEAT, &[keys::NODES, keys::STEADY])
                .arg(&*self.node)
                .arg(self.node_timeout.as_millis() as u64)
                .clone()])
            .await?;
        check_all(&r)?;
        let gap = r.first().and_then(as_int).unwrap_or(-1);
        Ok(u64::try_from(gap).ok())
    }

    /// Write this pod's connection count; the counts of the live pods
    /// (this one among them), and how many pods are draining.
    pub async fn pod_loads(&self, mine: usize) -> Result<(Vec<u64>, usize), StoreError> {
        let r = self
            .query_cmds(vec![
                eval(&LUA_LOAD, &[keys::NODES, keys::LOAD])
                    .arg(&*self.node)
                    .arg(mine)
                    .arg(self.node_timeout.as_millis() as u64)
                    .clone(),
                redis::cmd("HLEN").arg(keys::DRAINING).clone(),
            ])
            .await?;
        check_all(&r)?;
        let loads = match r.first() {
            Some(Value::Array(v)) => v
                .iter()
                .filter_map(as_int)
                .filter_map(|n| u64::try_from(n).ok())
                .collect(),
            _ => Vec::new(),
        };
        let draining = r
            .get(1)
            .and_then(as_int)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        Ok((loads, draining))
    }

    /// Take this pod's count out of the rebalance (it is draining): the
    /// others then compare themselves with the pods that stay.
    pub async fn leave_loads(&self) -> Result<(), StoreError> {
        self.hash_leave(keys::LOAD).await
    }

    /// Count this pod among the draining ones; how many live pods are
    /// draining now (this one among them).
    pub async fn draining_pods(&self) -> Result<usize, StoreError> {
        let r = self
            .query_cmds(vec![eval(&LUA_LOAD, &[keys::NODES, keys::DRAINING])
                .arg(&*self.node)
                .arg("since")
                .arg(self.node_timeout.as_millis() as u64)
                .clone()])
            .await?;
        check_all(&r)?;
        Ok(match r.first() {
            Some(Value::Array(v)) => v.len().max(1),
            _ => 1,
        })
    }

    /// Write this pod's template revision; the live pods' revisions (this
    /// one's among them).
    pub async fn revisions(&self, revision: &str) -> Result<Vec<PodRevision>, StoreError> {
        let r = self
            .query_cmds(vec![eval(
                &LUA_REVISIONS,
                &[keys::NODES, keys::REVISIONS, keys::DRAINING],
            )
            .arg(&*self.node)
            .arg(revision)
            .arg(self.node_timeout.as_millis() as u64)
            .clone()])
            .await?;
        check_all(&r)?;
        let Some(Value::Array(v)) = r.first() else {
            return Err(StoreError::Reply("revisions: not an array"));
        };
        let Some(now) = v
            .first()
            .and_then(as_str)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return Err(StoreError::Reply("revisions: no time"));
        };
        Ok(v[1..]
            .chunks_exact(3)
            .filter_map(|e| {
                let (since, revision) = as_str(&e[1])?.split_once(' ')?;
                Some(PodRevision {
                    mine: as_str(&e[0])? == &*self.node,
                    revision: revision.to_string(),
                    since_ms: since.parse().ok()?,
                    draining_for_ms: as_str(&e[2])
                        .and_then(|d| d.parse::<u64>().ok())
                        .map(|d| now.saturating_sub(d)),
                })
            })
            .collect())
    }

    /// This pod's drain is over.
    pub async fn done_draining(&self) -> Result<(), StoreError> {
        self.hash_leave(keys::DRAINING).await
    }

    async fn hash_leave(&self, key: &str) -> Result<(), StoreError> {
        let r = self
            .query_cmds(vec![redis::cmd("HDEL").arg(key).arg(&*self.node).clone()])
            .await?;
        check_all(&r)
    }

    /// How often this pod writes its heartbeat: several times per node
    /// timeout, so that one late beat never makes it look dead.
    pub(super) fn beat_every(&self) -> Duration {
        (self.node_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Heartbeats and recovery after an outage. Nothing slow runs here:
    /// clean-up of dead pods and expiries is the sweeper's.
    pub(super) async fn supervisor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.beat_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => {
                    self.leave().await;
                    return;
                }
            }
            n += 1;
            let was_healthy = self.healthy.load(Ordering::Relaxed);
            let t0 = Instant::now();
            let beat = self.heartbeat().await;
            let rtt = t0.elapsed();
            let gap = match beat {
                Ok(g) => g,
                Err(_) => {
                    self.unsteady();
                    continue;
                }
            };
            // Redis's clock jumped for this pod (Redis or this pod was
            // paused), or Redis answered slowly: the other pods may not
            // have had their turn to beat. Nobody is declared dead by this
            // pod until it has seen a whole node timeout of steady beats.
            let jumped = gap.is_none_or(|g| g > (self.node_timeout / 2).as_millis() as u64);
            if jumped || rtt > self.node_timeout / 4 {
                self.unsteady();
            }
            if gap.is_none() && was_healthy {
                // Declared dead while alive (a pause longer than the node
                // timeout): the others dropped this pod's routes and
                // released its sessions. Announce everything again.
                warn!("this pod was taken for dead; announcing its routes and sessions again");
                self.healthy.store(false, Ordering::Relaxed);
            }
            if !self.healthy.load(Ordering::Relaxed) {
                match self.resync().await {
                    Ok(()) => {
                        self.healthy.store(true, Ordering::Relaxed);
                        info!("Redis is back: accepting connections again");
                    }
                    Err(e) => {
                        debug!(error = %e, "resync failed");
                        continue;
                    }
                }
            }
            if n.is_multiple_of(4) {
                self.check_inbox().await;
            }
        }
    }

    /// The inbox's length, and what its cap (`MAXLEN`) removed before this
    /// pod read it: every entry ever added was read here, is still there,
    /// or was cut by the cap (the pod trims only what it read).
    pub(super) async fn check_inbox(&self) {
        let Ok(r) = self
            .query_cmds(vec![redis::cmd("XINFO")
                .arg("STREAM")
                .arg(keys::inbox(&self.node))
                .clone()])
            .await
        else {
            return;
        };
        let info = r.first().map(pairs).unwrap_or_default();
        let field = |name: &str| {
            info.iter()
                .find(|(k, _)| as_str(k) == Some(name))
                .and_then(|(_, v)| as_int(v))
                .map(|n| n.max(0) as u64)
        };
        let (Some(len), Some(added)) = (field("length"), field("entries-added")) else {
            return;
        };
        self.stream_lag.store(len, Ordering::Relaxed);
        let read = self.inbox_read.load(Ordering::Relaxed);
        // At least this many were cut unread (entries read but not yet
        // trimmed count in `len`, so this never over-counts).
        let cut = added.saturating_sub(read).saturating_sub(len);
        let known = self.inbox_cut.load(Ordering::Relaxed);
        if cut > known {
            self.inbox_cut.store(cut, Ordering::Relaxed);
            warn!(
                entries = cut - known,
                "the inbox cap removed entries this pod had not read: their messages are lost for the subscribers here"
            );
        }
    }

    /// Not steady: no pod is declared dead from here for a node timeout.
    pub(super) fn unsteady(&self) {
        *self.steady_since.lock() = Instant::now();
    }

    /// Dead pods, due wills and expired sessions, off the heartbeat path:
    /// a slow clean-up never delays this pod's heartbeats.
    pub(super) async fn sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if !self.is_ready() {
                continue;
            }
            if self.steady_since.lock().elapsed() >= self.node_timeout {
                self.sweep_dead_nodes().await;
            }
            self.fire_due_wills().await;
            self.sweep_expired().await;
        }
    }

    /// Write this pod's state again: its node entry, routes and sessions.
    /// Runs at start and after Redis was unreachable (it may have restarted
    /// empty, or declared this pod dead meanwhile).
    pub(super) async fn resync(&self) -> Result<(), StoreError> {
        let routes: Vec<ByteString> = self.local_routes.lock().keys().cloned().collect();
        let mut cmds = vec![
            redis::cmd("DEL").arg(keys::routes(&self.node)).clone(),
            Event::PodHello { node: &self.node }.cmd(),
        ];
        for f in &routes {
            cmds.push(on_key("SADD", &keys::routes(&self.node), f.as_bytes()));
            cmds.push(
                Event::RouteAdded {
                    node: &self.node,
                    filter: f,
                }
                .cmd(),
            );
            if f.starts_with("$share/") {
                cmds.push(group_create(f));
            }
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for c in cmds {
            pipe.add_command(c);
        }
        self.query(&pipe).await?;
        for (session, epoch, expiry) in self.local.local_sessions() {
            let cid = &session.client_id;
            let r = self
                .query_cmds(vec![session_eval(&LUA_RECLAIM, cid)
                    .arg(&*self.node)
                    .arg(epoch)
                    .arg(expiry)
                    .clone()])
                .await?;
            match r.first().and_then(as_int) {
                Some(0) => self.local.kick_local(cid, None),
                Some(existed) => {
                    let mut cmds = vec![redis::cmd("SADD")
                        .arg(keys::node_sessions(&self.node))
                        .arg(&**cid)
                        .clone()];
                    if session.is_stream_fed() && existed == 1 {
                        // Redis lost it: write the subscriptions back.
                        let subs: Vec<_> = session
                            .state
                            .lock()
                            .subscriptions
                            .iter()
                            .map(|(f, e)| (f.clone(), e.options, e.sub_id))
                            .collect();
                        for (f, o, id) in subs {
                            self.psub_add_cmds(cid, &f, o, id, &mut cmds);
                        }
                    }
                    self.query_cmds(cmds).await?;
                }
                None => return Err(StoreError::Reply("reclaim")),
            }
        }
        Ok(())
    }

    pub(super) async fn sweep_dead_nodes(&self) {
        let timeout_ms = self.node_timeout.as_millis() as u64;
        let Ok(r) = self
            .query_cmds(vec![eval(&LUA_DEAD, &[keys::NODES, keys::STEADY])
                .arg(timeout_ms)
                .arg(100)
                .arg(&*self.node)
                .clone()])
            .await
        else {
            return;
        };
        let dead: Vec<String> = str_list(r.first())
            .into_iter()
            .filter(|n| *n != &*self.node)
            .map(str::to_string)
            .collect();
        for node in dead {
            let lock = self
                .query_cmds(vec![redis::cmd("SET")
                    .arg(keys::lock(&node))
                    .arg(&*self.node)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_MS)
                    .clone()])
                .await;
            if !matches!(lock.as_deref(), Ok([Value::Okay])) {
                continue;
            }
            if let Err(e) = self.clean_up_node(&node).await {
                warn!(node, error = %e, "cleaning up a dead pod failed; will retry");
                let _ = self
                    .query_cmds(vec![redis::cmd("DEL").arg(keys::lock(&node)).clone()])
                    .await;
            }
        }
    }

    /// A pod died: its sessions are released (persistent ones go offline,
    /// the others end), their wills published — once, and only for
    /// sessions still held by that pod — or scheduled when they have a
    /// delay, and its routes dropped. Done in pipelined steps of
    /// [`CLEANUP_STEP`] sessions, renewing the lock between steps.
    pub(super) async fn clean_up_node(&self, node: &str) -> Result<(), StoreError> {
        info!(
            node,
            "a pod stopped sending heartbeats: taking over its clients' wills and sessions"
        );
        let r = self
            .query_cmds(vec![
                redis::cmd("SMEMBERS")
                    .arg(keys::node_sessions(node))
                    .clone(),
                redis::cmd("SMEMBERS").arg(keys::routes(node)).clone(),
            ])
            .await?;
        check_all(&r)?;
        let cids: Vec<String> = str_list(r.first())
            .into_iter()
            .map(str::to_string)
            .collect();
        let routes: Vec<String> = str_list(r.get(1)).into_iter().map(str::to_string).collect();
        for chunk in cids.chunks(CLEANUP_STEP) {
            let cmds = chunk
                .iter()
                .map(|cid| {
                    // Persistent or not is the session's own business: the
                    // script reads its expiry.
                    eval(&LUA_RELEASE_DEAD, &[&keys::session(cid), &keys::queue(cid)])
                        .arg(node)
                        .clone()
                })
                .collect();
            let replies = self.query_cmds(cmds).await?;
            check_all(&replies)?;
            let mut after = vec![eval(&LUA_RENEW, &[&keys::lock(node)])
                .arg(&*self.node)
                .arg(LOCK_MS)
                .clone()];
            for (cid, reply) in chunk.iter().zip(&replies) {
                let rel = Released::from_reply(Some(reply));
                if rel.code == 1 {
                    self.went_offline_cmds(cid, &rel, &mut after);
                }
                self.publish_stored_will(rel.will);
            }
            check_all(&self.query_cmds(after).await?)?;
        }
        // One key per DEL: the inbox lives in the pod's own slot, and a
        // multi-key DEL across slots fails on Redis Cluster (CROSSSLOT).
        let mut cmds = vec![
            redis::cmd("DEL").arg(keys::routes(node)).clone(),
            redis::cmd("DEL").arg(keys::node_sessions(node)).clone(),
            redis::cmd("DEL").arg(keys::inbox(node)).clone(),
            redis::cmd("ZREM").arg(keys::NODES).arg(node).clone(),
            redis::cmd("HDEL").arg(keys::STEADY).arg(node).clone(),
            redis::cmd("HDEL").arg(keys::LOAD).arg(node).clone(),
            redis::cmd("HDEL").arg(keys::DRAINING).arg(node).clone(),
            Event::PodDead { node }.cmd(),
        ];
        for f in routes.iter().filter(|f| f.starts_with("$share/")) {
            cmds.push(del_consumer(f, node));
        }
        check_all(&self.query_cmds(cmds).await?)?;
        self.routes.write().drop_node(node);
        Ok(())
    }

    /// Delayed wills whose time came (by Redis's clock), each published by
    /// exactly one pod and only if its client is still away.
    pub(super) async fn fire_due_wills(&self) {
        let cids = self.due(keys::WILLS).await;
        if cids.is_empty() {
            return;
        }
        let mut cmds = Vec::with_capacity(cids.len() * 2);
        for cid in &cids {
            cmds.push(eval(&LUA_FIRE_WILL, &[&keys::session(cid)]));
            cmds.push(redis::cmd("ZREM").arg(keys::WILLS).arg(cid).clone());
        }
        let Ok(replies) = self.query_cmds(cmds).await else {
            return;
        };
        for r in replies.iter().step_by(2) {
            self.publish_stored_will(val_bytes(Some(r)));
        }
    }

    /// Up to [`SWEEP_BATCH`] members of a time-scored set that are due by
    /// Redis's clock (none when Redis does not answer).
    async fn due(&self, set: &str) -> Vec<String> {
        match self
            .query_cmds(vec![eval(&LUA_DUE, &[set]).arg(SWEEP_BATCH).clone()])
            .await
        {
            Ok(r) => str_list(r.first())
                .into_iter()
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Publish a will taken out of Redis (its stored bytes; none when
    /// empty).
    fn publish_stored_will(&self, will: Option<Bytes>) {
        let Some(w) = will.filter(|b| !b.is_empty()) else {
            return;
        };
        if let Ok((m, _)) = wire::decode_message(w) {
            self.publish_will(Arc::new(m));
        }
    }

    /// Offline sessions whose expiry passed (by Redis's clock), in
    /// pipelined batches until none is due or the step's time is spent:
    /// keeps up with thousands of expiries a second.
    pub(super) async fn sweep_expired(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(500) {
            let cids = self.due(keys::EXPIRY).await;
            if cids.is_empty() {
                return;
            }
            let mut cmds = Vec::with_capacity(cids.len() * 2);
            for cid in &cids {
                cmds.push(session_eval(&LUA_EXPIRE, cid));
                cmds.push(redis::cmd("ZREM").arg(keys::EXPIRY).arg(cid).clone());
            }
            let Ok(replies) = self.query_cmds(cmds).await else {
                return;
            };
            let mut after = Vec::new();
            for (cid, r) in cids.iter().zip(replies.iter().step_by(2)) {
                let Some(a) = as_array(r) else { continue };
                if a.first().and_then(as_int) != Some(1) {
                    continue;
                }
                for f in str_list(a.get(1)) {
                    if let Some(filter) = f.strip_prefix("sub:") {
                        self.psub_remove_cmds(cid, filter, &mut after);
                    }
                }
                after.push(redis::cmd("ZREM").arg(keys::WILLS).arg(cid).clone());
                // The session ended: a will still waiting goes now.
                self.publish_stored_will(val_bytes(a.get(2)));
                debug!(client_id = cid, "session expired");
            }
            self.run_later(after);
            if cids.len() < SWEEP_BATCH {
                return;
            }
        }
    }

    /// Graceful exit: routes and node entry removed so that nobody sends
    /// here any more.
    pub(super) async fn leave(&self) {
        let _ = self
            .query_cmds(vec![
                redis::cmd("DEL").arg(keys::routes(&self.node)).clone(),
                redis::cmd("DEL").arg(keys::inbox(&self.node)).clone(),
                redis::cmd("ZREM").arg(keys::NODES).arg(&*self.node).clone(),
                redis::cmd("HDEL")
                    .arg(keys::STEADY)
                    .arg(&*self.node)
                    .clone(),
                redis::cmd("HDEL").arg(keys::LOAD).arg(&*self.node).clone(),
                redis::cmd("HDEL")
                    .arg(keys::REVISIONS)
                    .arg(&*self.node)
                    .clone(),
                redis::cmd("HDEL")
                    .arg(keys::DRAINING)
                    .arg(&*self.node)
                    .clone(),
                Event::PodDead { node: &self.node }.cmd(),
            ])
            .await;
    }
}
