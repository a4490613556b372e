//! This pod's inbox: messages from other pods, wake-ups, kicks.

use super::*;

impl RedisStore {
    /// Follow this pod's inbox: messages from other pods, wakes, kicks.
    pub(super) async fn inbox_reader(self: Arc<Self>) {
        let inbox = keys::inbox(&self.node);
        // Kept across reconnects, so a Redis blip redelivers nothing.
        let mut in_id = "0-0".to_string();
        let mut checked = Instant::now();
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let Some(mut con) = self.blocking_conn().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            loop {
                let read = xread(&inbox, &in_id);
                let reply = tokio::select! {
                    r = con.run(&read) => r,
                    _ = self.shutdown.cancelled() => return,
                };
                let reply = match reply {
                    Ok(v) => v,
                    Err(e) => {
                        self.failed("inbox read", &e);
                        break;
                    }
                };
                let mut trim = None;
                let mut behind = false;
                for (_, list) in streams(&reply) {
                    self.inbox_read
                        .fetch_add(list.len() as u64, Ordering::Relaxed);
                    behind |= list.len() >= READ_COUNT;
                    behind |= !list.is_empty() && checked.elapsed() >= INBOX_CHECK_EVERY;
                    for e in &list {
                        // A busy subscriber slows this reader (bounded), as
                        // it slows local publishers; a stalled one does not
                        // (see `Session::wait_for_space`).
                        self.on_inbox(e).await;
                    }
                    if let Some(e) = list.last() {
                        in_id = e.id.to_string();
                        trim = Some(in_id.clone());
                    }
                }
                if let Some(id) = trim {
                    // Everything before what was just read is delivered.
                    self.run_later(vec![trim_before(&inbox, &id)]);
                }
                if behind {
                    // A full read, or the first in a while (after a stall):
                    // this pod may have fallen behind the cap.
                    checked = Instant::now();
                    self.check_inbox().await;
                }
            }
        }
    }

    pub(super) async fn on_inbox(&self, e: &Entry<'_>) {
        let broker = &self.local;
        let Some(batch) = val_bytes(e.field("b")) else {
            return;
        };
        for rec in wire::records(batch) {
            match rec {
                Ok((wire::REC_MESSAGE, b)) => match wire::decode_message(b) {
                    Ok((m, _)) => {
                        let (m, span) = crate::trace::remote(m, "inbox");
                        let backlogged = span.in_scope(|| broker.deliver_remote(Arc::new(m)));
                        if let Some(s) = backlogged {
                            s.wait_for_space(BACKPRESSURE_WAIT).await;
                        }
                    }
                    Err(err) => warn!(error = %err, "unreadable message in the inbox"),
                },
                Ok((wire::REC_WAKE, b)) => {
                    if let Ok(cid) = std::str::from_utf8(&b) {
                        self.wake(cid);
                    }
                }
                Ok((wire::REC_KICK, b)) => match wire::parse_kick(b) {
                    Ok((cid, epoch)) => broker.kick_local(&cid, Some(epoch)),
                    Err(err) => warn!(error = %err, "unreadable kick in the inbox"),
                },
                Ok(_) => {}
                Err(err) => {
                    warn!(error = %err, "unreadable inbox entry");
                    break;
                }
            }
        }
    }
}
