//! The writer task: everything queued becomes one pipeline, and every reply is checked.

use super::*;

/// Told when the writer's pipeline that carried an operation is done.
pub(super) type Done = oneshot::Sender<Result<(), StoreFail>>;

/// Work for the writer task, which turns everything at hand into one
/// pipeline.
pub enum Op {
    Forward {
        msg: Arc<Message>,
        targets: Targets,
        done: Option<Done>,
    },
    Ack {
        client_id: ByteString,
        ack: StoreAck,
    },
    /// Tell the pod `node` that the connection of `client_id` with that
    /// pod's `epoch` was taken over.
    Kick {
        node: Arc<str>,
        client_id: ByteString,
        epoch: u64,
    },
    /// Tell the pod `node` that the stream of `client_id` has news.
    Wake {
        node: Arc<str>,
        client_id: ByteString,
    },
    Cmds {
        cmds: Vec<Cmd>,
        done: Option<Done>,
    },
}

/// A publish still on its way to Redis. Await [`Pending::finish`] before
/// acknowledging a QoS 1/2 message.
pub struct Pending {
    pub(super) send: Option<(mpsc::Sender<Op>, Op)>,
    pub(super) done: Option<oneshot::Receiver<Result<(), StoreFail>>>,
}

impl Pending {
    /// Whether the operation still has to be queued (the queue was full).
    pub fn must_wait(&self) -> bool {
        self.send.is_some() || self.done.is_some()
    }

    /// `Ok` once every Redis reply of the pipeline that carried the message
    /// said it was stored (or there was nothing to wait for).
    pub async fn finish(self) -> Result<(), StoreFail> {
        if let Some((tx, op)) = self.send {
            if tx.send(op).await.is_err() {
                return Err(StoreFail::Unavailable);
            }
        }
        match self.done {
            Some(rx) => rx.await.unwrap_or(Err(StoreFail::Unavailable)),
            None => Ok(()),
        }
    }
}

/// A pipeline being built, with the operation each command belongs to:
/// an error reply fails exactly the operations that needed that command.
pub(super) struct Batch {
    pub(super) pipe: redis::Pipeline,
    pub(super) owner: Vec<Option<usize>>,
}

impl Batch {
    pub(super) fn new() -> Batch {
        let mut pipe = redis::pipe();
        // Server errors come back as values, one per command: each is
        // looked at.
        pipe.ignore_errors();
        Batch {
            pipe,
            owner: Vec::new(),
        }
    }

    pub(super) fn add(&mut self, c: Cmd, op: Option<usize>) -> usize {
        self.pipe.add_command(c);
        self.owner.push(op);
        self.owner.len() - 1
    }
}

impl RedisStore {
    /// Queue commands for the writer and wait until Redis ran them.
    pub(super) async fn run_ordered(&self, cmds: Vec<Cmd>) -> Result<(), StoreError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Op::Cmds {
                cmds,
                done: Some(tx),
            })
            .await
            .map_err(|_| StoreError::NotReady)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(StoreError::NotReady),
        }
    }

    /// Queue commands for the writer without waiting.
    pub(super) fn run_later(&self, cmds: Vec<Cmd>) {
        if cmds.is_empty() {
            return;
        }
        self.send_op(Op::Cmds { cmds, done: None });
    }

    /// Send a message to the other pods, shared groups and persistent
    /// sessions that want it. Returns the number of targets and what to
    /// wait for before acknowledging it.
    pub fn forward(&self, msg: &Arc<Message>) -> (usize, Option<Pending>) {
        let mut targets = Targets::default();
        self.routes.read().matches(
            &msg.topic,
            msg.publisher.as_deref(),
            &self.node,
            &mut targets,
        );
        if targets.is_empty() {
            return (0, None);
        }
        let n = targets.len();
        let (done_tx, done_rx) = if msg.qos != QoS::AtMostOnce {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let op = Op::Forward {
            msg: msg.clone(),
            targets,
            done: done_tx,
        };
        (n, Some(self.pending(op, done_rx)))
    }

    /// Queue `op` for the writer now if there is room, else in the caller's
    /// `Pending::finish` (which so slows the caller down); `done` tells how
    /// it went.
    pub(super) fn pending(
        &self,
        op: Op,
        done: Option<oneshot::Receiver<Result<(), StoreFail>>>,
    ) -> Pending {
        let send = match self.ops.try_send(op) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(op)) => Some((self.ops.clone(), op)),
            // Shutting down: whoever waits hears that it failed (the
            // sender went with the operation).
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        };
        Pending { send, done }
    }

    /// A retained message was set or cleared on this pod.
    pub fn retain(&self, msg: &Message) {
        let mut cmds = Vec::with_capacity(2);
        if msg.payload.is_empty() {
            cmds.push(
                redis::cmd("HDEL")
                    .arg(keys::RETAINED)
                    .arg(&*msg.topic)
                    .clone(),
            );
            cmds.push(
                Event::RetainedCleared {
                    node: &self.node,
                    topic: &msg.topic,
                }
                .cmd(),
            );
        } else {
            let b = wire::message_bytes(msg);
            cmds.push(
                redis::cmd("HSET")
                    .arg(keys::RETAINED)
                    .arg(&*msg.topic)
                    .arg(&b[..])
                    .clone(),
            );
            cmds.push(
                Event::RetainedSet {
                    node: &self.node,
                    message: &b[..],
                }
                .cmd(),
            );
        }
        self.run_later(cmds);
    }

    /// The client acknowledged a message of a stream (its session's or a
    /// shared group's), or a counted rule dropped it: let go of the entry.
    pub fn ack(&self, client_id: &ByteString, ack: StoreAck) {
        if let StoreAck::Share { filter, id } = &ack {
            self.share_held.lock().remove(&(filter.clone(), id.clone()));
        }
        self.send_op(Op::Ack {
            client_id: client_id.clone(),
            ack,
        });
    }

    /// Queue an operation that nobody waits for, never dropping it: when
    /// the queue is full a task waits for room.
    pub(super) fn send_op(&self, op: Op) {
        if let Err(mpsc::error::TrySendError::Full(op)) = self.ops.try_send(op) {
            let tx = self.ops.clone();
            self.tasks.spawn(async move {
                let _ = tx.send(op).await;
            });
        }
    }

    pub(super) async fn writer(self: Arc<Self>, mut rx: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(BATCH_MAX);
        loop {
            batch.clear();
            let first = tokio::select! {
                op = rx.recv() => op,
                _ = self.shutdown.cancelled() => {
                    // Drain what is queued so that acknowledged work lands.
                    rx.close();
                    rx.recv().await
                }
            };
            let Some(first) = first else { return };
            batch.push(first);
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.write_batch(&mut batch, Some(&self.local.stats)).await;
        }
    }

    pub(super) async fn write_batch(&self, batch: &mut Vec<Op>, stats: Option<&Stats>) {
        let mut b = Batch::new();
        // Per waiting operation: who to tell, and how it went.
        let mut dones: Vec<(Done, Result<(), StoreFail>)> = Vec::new();
        // Pod → inbox entry being built, and the operations it carries.
        let mut inbox: HashMap<Arc<str>, (BytesMut, Vec<usize>)> = HashMap::new();
        // Session enqueues: pipeline slot, client id, the pod woken with it.
        let mut enqueues: Vec<(usize, ByteString, Option<Arc<str>>)> = Vec::new();
        let in_order = matches!(self.cmd, Conn::Single(_));
        let mut acks: HashMap<ByteString, Vec<ByteString>> = HashMap::new();
        let mut share_acks: HashMap<ByteString, Vec<ByteString>> = HashMap::new();
        // Spans of traced messages: they end when the pipeline is done.
        let mut spans = Vec::new();
        {
            for op in batch.drain(..) {
                match op {
                    Op::Forward { msg, targets, done } => {
                        let slot = done.map(|d| {
                            dones.push((d, Ok(())));
                            dones.len() - 1
                        });
                        if crate::trace::enabled() {
                            spans.extend(crate::trace::redis_append(&msg, targets.len()));
                        }
                        let bytes = wire::message_bytes(&msg);
                        for node in &targets.nodes {
                            let (buf, ops) = inbox.entry(node.clone()).or_default();
                            wire::put_record(buf, wire::REC_MESSAGE, &bytes);
                            ops.extend(slot);
                        }
                        for full in &targets.shares {
                            let c = redis::cmd("XADD")
                                .arg(keys::share(full))
                                .arg("MAXLEN")
                                .arg("~")
                                .arg(SHARE_MAXLEN)
                                .arg("*")
                                .arg("m")
                                .arg(&bytes[..])
                                .clone();
                            b.add(c, slot);
                        }
                        for (cid, qos) in &targets.sessions {
                            if (*qos).min(msg.qos) == QoS::AtMostOnce {
                                continue;
                            }
                            // On one Redis the pipeline runs in order: a wake
                            // placed after the append cannot overtake it, so
                            // the owner last seen is woken in the same round
                            // trip (the reply corrects a stale guess).
                            let guess = if in_order {
                                self.owner_hints.lock().get(cid).cloned()
                            } else {
                                None
                            };
                            let c = session_eval(&LUA_ENQUEUE, cid)
                                .arg(self.max_queued)
                                .arg(&bytes[..])
                                .arg(guess.as_deref().unwrap_or_default())
                                .clone();
                            let i = b.add(c, slot);
                            if let Some(o) = &guess {
                                let (buf, _) = inbox.entry(o.clone()).or_default();
                                wire::put_record(buf, wire::REC_WAKE, cid.as_bytes());
                            }
                            enqueues.push((i, cid.clone(), guess));
                        }
                    }
                    Op::Ack { client_id, ack } => match ack {
                        StoreAck::Session(id) => acks.entry(client_id).or_default().push(id),
                        StoreAck::Share { filter, id } => {
                            share_acks.entry(filter).or_default().push(id)
                        }
                    },
                    Op::Kick {
                        node,
                        client_id,
                        epoch,
                    } => {
                        let (buf, _) = inbox.entry(node).or_default();
                        wire::put_record(buf, wire::REC_KICK, &wire::kick_body(&client_id, epoch));
                    }
                    Op::Wake { node, client_id } => {
                        let (buf, _) = inbox.entry(node).or_default();
                        wire::put_record(buf, wire::REC_WAKE, client_id.as_bytes());
                    }
                    Op::Cmds { cmds, done } => {
                        let slot = done.map(|d| {
                            dones.push((d, Ok(())));
                            dones.len() - 1
                        });
                        for c in cmds {
                            b.add(c, slot);
                        }
                    }
                }
            }
        }
        for (cid, ids) in acks {
            let mut c = redis::cmd("XDEL");
            c.arg(keys::queue(&cid));
            for id in ids {
                c.arg(&*id);
            }
            b.add(c, None);
        }
        for (full, ids) in share_acks {
            let mut c = redis::cmd("XACK");
            c.arg(keys::share(&full)).arg(keys::GROUP);
            for id in ids {
                c.arg(&*id);
            }
            b.add(c, None);
        }
        // Inbox entries: one per pod; every operation in it depends on it.
        let mut inbox_slots = Vec::with_capacity(inbox.len());
        for (node, (buf, ops)) in inbox {
            // Capped (a pod that stopped reading cannot grow Redis without
            // bound); the owner trims what it has read.
            let c = redis::cmd("XADD")
                .arg(keys::inbox(&node))
                .arg("MAXLEN")
                .arg("~")
                .arg(self.inbox_max)
                .arg("*")
                .arg("b")
                .arg(&buf[..])
                .clone();
            inbox_slots.push((b.add(c, None), ops));
        }
        if b.owner.is_empty() {
            for (d, r) in dones {
                let _ = d.send(r);
            }
            return;
        }
        let results = self.query_waiting(&b.pipe, !dones.is_empty()).await;
        let mut wakes = Vec::new();
        match results {
            Ok(Replies {
                values: results,
                unreplicated,
                retried,
            }) => {
                let mut fail = |op: Option<usize>, f: StoreFail| {
                    if let Some(slot) = op.and_then(|o| dones.get_mut(o)) {
                        if slot.1.is_ok() {
                            slot.1 = Err(f);
                        }
                    }
                };
                let mut errors = 0u64;
                for (i, v) in results.iter().enumerate() {
                    if let Value::ServerError(e) = v {
                        errors += 1;
                        let f = StoreFail::of(e);
                        fail(b.owner.get(i).copied().flatten(), f);
                        for (slot, ops) in &inbox_slots {
                            if *slot == i {
                                for &o in ops {
                                    fail(Some(o), f);
                                }
                            }
                        }
                        self.log_write_error(e);
                    }
                }
                // Stored, but not yet where it survives the primary's loss.
                for &i in &unreplicated {
                    fail(b.owner.get(i).copied().flatten(), StoreFail::Unavailable);
                    for (slot, ops) in &inbox_slots {
                        if *slot == i {
                            for &o in ops {
                                fail(Some(o), StoreFail::Unavailable);
                            }
                        }
                    }
                }
                if results.len() < b.owner.len() {
                    // A reply went missing: nothing of it is known stored.
                    for op in b.owner.iter().skip(results.len()) {
                        fail(*op, StoreFail::Unavailable);
                    }
                }
                for (i, cid, mut guess) in enqueues {
                    if retried.contains(&i) {
                        // Sent again after the wake that went with it: the
                        // owner is woken once more, after the append.
                        guess = None;
                    }
                    // 1 alone: appended, and the pod woken with it serves
                    // the session.
                    let (code, owner) = match results.get(i) {
                        Some(Value::Int(1)) => (Some(1), guess.as_deref().unwrap_or_default()),
                        Some(Value::Int(_)) => (None, ""),
                        Some(v) => match as_array(v) {
                            Some(r) => (
                                r.first().and_then(as_int),
                                r.get(1).and_then(as_str).unwrap_or_default(),
                            ),
                            // An error reply, counted above.
                            None => continue,
                        },
                        None => continue,
                    };
                    match code {
                        Some(1) => {}
                        Some(0) => {
                            if let Some(s) = stats {
                                s.dropped(DropReason::QueueFull);
                            }
                        }
                        // The session ended meanwhile: nothing to deliver.
                        Some(-1) => {}
                        _ => {
                            errors += 1;
                            fail(b.owner.get(i).copied().flatten(), StoreFail::Unavailable);
                        }
                    }
                    // The pod serving the session, as Redis knows it, is
                    // woken once the entry is there (on a Redis Cluster the
                    // parts of a pipeline run in parallel), unless the guess
                    // woken in the same pipeline was right. No pod polls an
                    // idle session.
                    if !owner.is_empty() && code == Some(1) {
                        if guess.as_deref() != Some(owner) {
                            let node: Arc<str> = Arc::from(owner);
                            if in_order {
                                self.hint_owner(&cid, node.clone());
                            }
                            wakes.push(Op::Wake {
                                node,
                                client_id: cid,
                            });
                        }
                    } else if guess.is_some() {
                        self.owner_hints.lock().remove(&cid);
                    }
                }
                if errors > 0 {
                    self.redis_errors.fetch_add(errors, Ordering::Relaxed);
                }
            }
            Err(_) => {
                for d in &mut dones {
                    d.1 = Err(StoreFail::Unavailable);
                }
            }
        }
        for (d, r) in dones {
            let _ = d.send(r);
        }
        drop(spans);
        for w in wakes {
            self.send_op(w);
        }
    }

    /// Remember which pod serves a session (learned from an enqueue's
    /// reply). Bounded: past the cap the guesses start again from none.
    fn hint_owner(&self, client_id: &ByteString, node: Arc<str>) {
        let mut h = self.owner_hints.lock();
        if h.len() >= OWNER_HINTS_MAX {
            h.clear();
        }
        h.insert(client_id.clone(), node);
    }

    /// Writes the replicas did not confirm: counted, logged at most every
    /// 10 s.
    pub(super) fn unreplicated_logged(&self, n: usize) {
        self.unreplicated.fetch_add(n as u64, Ordering::Relaxed);
        if self.rate_limited_log() {
            warn!("Redis replicas did not confirm writes in time: publishers get an error code");
        }
    }

    /// Whether a rate-limited warning may be logged now (one per 10 s).
    fn rate_limited_log(&self) -> bool {
        let now = wire::unix_ms() / 1000;
        let last = self.write_error_logged.load(Ordering::Relaxed);
        now >= last + 10
            && self
                .write_error_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// A write Redis refused: logged at most every 10 s (a full Redis
    /// refuses every write).
    pub(super) fn log_write_error(&self, e: &redis::ServerError) {
        if self.rate_limited_log() {
            warn!(
                code = e.code(),
                "Redis refused a write: publishers get an error code"
            );
        }
    }
}
