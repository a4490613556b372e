//! The replicated view of the cluster: a snapshot, then the events stream.

use super::*;

/// One entry of the events stream that every pod follows to keep its view
/// of the cluster. The wire form (a tag in field `t`, short field names)
/// is what older and newer pods both read; unknown tags are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event<'a> {
    /// Pod `node` has subscribers for `filter` (`$share/…` included).
    RouteAdded {
        node: &'a str,
        filter: &'a str,
    },
    /// Pod `node` has none any more.
    RouteRemoved {
        node: &'a str,
        filter: &'a str,
    },
    /// A persistent session subscribed; `options` as `wire::encode_sub`.
    SessionSubscribed {
        node: &'a str,
        client: &'a str,
        filter: &'a str,
        options: &'a str,
    },
    SessionUnsubscribed {
        node: &'a str,
        client: &'a str,
        filter: &'a str,
    },
    /// A retained message set on `node` (encoded as `wire::message_bytes`).
    RetainedSet {
        node: &'a str,
        message: &'a [u8],
    },
    RetainedCleared {
        node: &'a str,
        topic: &'a str,
    },
    /// `node` died (or left): its routes go.
    PodDead {
        node: &'a str,
    },
    /// `node` (re)joined and announces its routes anew.
    PodHello {
        node: &'a str,
    },
}

impl<'a> Event<'a> {
    /// The tag and fields as written.
    fn fields(&self) -> (&'static str, Vec<(&'static str, &'a [u8])>) {
        let b = str::as_bytes;
        match *self {
            Event::RouteAdded { node, filter } => ("r+", vec![("n", b(node)), ("f", b(filter))]),
            Event::RouteRemoved { node, filter } => ("r-", vec![("n", b(node)), ("f", b(filter))]),
            Event::SessionSubscribed {
                node,
                client,
                filter,
                options,
            } => (
                "p+",
                vec![
                    ("n", b(node)),
                    ("c", b(client)),
                    ("f", b(filter)),
                    ("o", b(options)),
                ],
            ),
            Event::SessionUnsubscribed {
                node,
                client,
                filter,
            } => (
                "p-",
                vec![("n", b(node)), ("c", b(client)), ("f", b(filter))],
            ),
            Event::RetainedSet { node, message } => ("rs", vec![("n", b(node)), ("m", message)]),
            Event::RetainedCleared { node, topic } => ("rd", vec![("n", b(node)), ("k", b(topic))]),
            Event::PodDead { node } => ("dead", vec![("n", b(node))]),
            Event::PodHello { node } => ("hello", vec![("n", b(node))]),
        }
    }

    /// `XADD` of this event to the capped events stream.
    pub(super) fn cmd(&self) -> Cmd {
        let (tag, fields) = self.fields();
        let mut c = redis::cmd("XADD");
        c.arg(keys::EVENTS)
            .arg("MAXLEN")
            .arg("~")
            .arg(EVENTS_MAXLEN)
            .arg("*")
            .arg("t")
            .arg(tag);
        for (k, v) in fields {
            c.arg(k).arg(v);
        }
        c
    }

    /// Read an entry of the events stream; `None` for an unknown tag or a
    /// missing field.
    pub(super) fn parse(e: &'a Entry<'a>) -> Option<Event<'a>> {
        let s = |k: &str| e.field(k).and_then(as_str);
        let node = s("n")?;
        Some(match s("t")? {
            "r+" => Event::RouteAdded {
                node,
                filter: s("f")?,
            },
            "r-" => Event::RouteRemoved {
                node,
                filter: s("f")?,
            },
            "p+" => Event::SessionSubscribed {
                node,
                client: s("c")?,
                filter: s("f")?,
                options: s("o")?,
            },
            "p-" => Event::SessionUnsubscribed {
                node,
                client: s("c")?,
                filter: s("f")?,
            },
            "rs" => Event::RetainedSet {
                node,
                message: e.field("m").and_then(as_bytes)?,
            },
            "rd" => Event::RetainedCleared {
                node,
                topic: s("k")?,
            },
            "dead" => Event::PodDead { node },
            "hello" => Event::PodHello { node },
            _ => return None,
        })
    }
}

impl RedisStore {
    /// Load routes, owners and retained messages; returns the events id to
    /// follow from.
    pub(super) async fn load_snapshot(&self) -> Result<String, StoreError> {
        let head = self
            .query_cmds(vec![
                redis::cmd("XREVRANGE")
                    .arg(keys::EVENTS)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .clone(),
                redis::cmd("ZRANGE").arg(keys::NODES).arg(0).arg(-1).clone(),
                redis::cmd("HGETALL").arg(keys::PSUBS).clone(),
                redis::cmd("HGETALL").arg(keys::RETAINED).clone(),
            ])
            .await?;
        let [ev, nodes, psubs, retained] = &head[..] else {
            return Err(StoreError::Reply("snapshot"));
        };
        let last = entries(ev)
            .first()
            .map_or_else(|| "0-0".to_string(), |e| e.id.to_string());
        let nodes: Vec<&str> = as_array(nodes)
            .unwrap_or_default()
            .iter()
            .filter_map(as_str)
            .collect();
        let route_sets = self
            .query_cmds(
                nodes
                    .iter()
                    .map(|n| redis::cmd("SMEMBERS").arg(keys::routes(n)).clone())
                    .collect(),
            )
            .await?;
        let mut table = RemoteRoutes::default();
        for (n, set) in nodes.iter().zip(&route_sets) {
            let node: Arc<str> = Arc::from(*n);
            for f in as_array(set).unwrap_or_default().iter().filter_map(as_str) {
                table.add_node_route(&node, &ByteString::from(f));
            }
        }
        for (k, v) in pairs(psubs) {
            let (Some(k), Some(v)) = (as_str(k), as_str(v)) else {
                continue;
            };
            let Some((cid, filter)) = k.split_once('\n') else {
                continue;
            };
            if let Ok((o, _)) = wire::decode_sub(v) {
                table.add_session(
                    &ByteString::from(cid),
                    filter,
                    SessionSub {
                        qos: o.qos,
                        no_local: o.no_local,
                    },
                );
            }
        }
        // This pod's own routes are re-added: after a Redis restart they
        // come back through `resync`, but matching must not miss them.
        for f in self.local_routes.lock().keys() {
            table.add_node_route(&self.node, f);
        }
        *self.routes.write() = table;
        let mut msgs = Vec::new();
        for (_, v) in pairs(retained) {
            if let Some(Ok((m, _))) = val_bytes(Some(v)).map(wire::decode_message) {
                msgs.push(Arc::new(m));
            }
        }
        self.local.replace_retained(msgs);
        Ok(last)
    }

    /// Follow the events stream, after loading the snapshot.
    pub(super) async fn events_reader(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let Some(mut con) = self.blocking_conn().await else {
                self.reader_ok.store(false, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            let mut ev_id = match self.load_snapshot().await {
                Ok(id) => id,
                Err(e) => {
                    debug!(error = %e, "snapshot failed");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            self.reader_ok.store(true, Ordering::Relaxed);
            loop {
                let read = xread(keys::EVENTS, &ev_id);
                let reply = tokio::select! {
                    r = con.run(&read) => r,
                    _ = self.shutdown.cancelled() => return,
                };
                let reply = match reply {
                    Ok(v) => v,
                    Err(e) => {
                        self.failed("events read", &e);
                        self.reader_ok.store(false, Ordering::Relaxed);
                        break;
                    }
                };
                for (_, list) in streams(&reply) {
                    for e in &list {
                        self.on_event(e);
                    }
                    if let Some(e) = list.last() {
                        ev_id = e.id.to_string();
                    }
                }
            }
        }
    }

    pub(super) fn on_event(&self, e: &Entry<'_>) {
        let Some(ev) = Event::parse(e) else { return };
        match ev {
            Event::RouteAdded { node, filter } => {
                self.routes
                    .write()
                    .add_node_route(&Arc::from(node), &ByteString::from(filter));
            }
            Event::RouteRemoved { node, filter } => {
                // This pod's own route stays while it has subscribers.
                if node != &*self.node || !self.local_routes.lock().contains_key(filter) {
                    self.routes.write().remove_node_route(node, filter);
                }
            }
            Event::SessionSubscribed {
                client,
                filter,
                options,
                ..
            } => {
                if let Ok((o, _)) = wire::decode_sub(options) {
                    self.routes.write().add_session(
                        &ByteString::from(client),
                        filter,
                        SessionSub {
                            qos: o.qos,
                            no_local: o.no_local,
                        },
                    );
                }
            }
            Event::SessionUnsubscribed { client, filter, .. } => {
                self.routes.write().remove_session(client, filter);
            }
            Event::RetainedSet { node, message } => {
                if node == &*self.node {
                    return;
                }
                if let Ok((m, _)) = wire::decode_message(Bytes::copy_from_slice(message)) {
                    self.local.mirror_retained(Arc::new(m));
                }
            }
            Event::RetainedCleared { node, topic } => {
                if node == &*self.node {
                    return;
                }
                self.local.mirror_retained(Arc::new(Message::from_wire(
                    ByteString::from(topic),
                    Bytes::new(),
                    QoS::AtMostOnce,
                    true,
                    Default::default(),
                    None,
                )));
            }
            Event::PodDead { node } | Event::PodHello { node } => {
                if node != &*self.node {
                    self.routes.write().drop_node(node);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event reads back as written (through the reply shape XREAD
    /// gives), and an unknown tag is skipped.
    #[test]
    fn events_read_back_as_written() {
        let all = [
            Event::RouteAdded {
                node: "p1",
                filter: "a/+",
            },
            Event::RouteRemoved {
                node: "p1",
                filter: "$share/g/a",
            },
            Event::SessionSubscribed {
                node: "p2",
                client: "c",
                filter: "x/#",
                options: "1,0,0,0,0",
            },
            Event::SessionUnsubscribed {
                node: "p2",
                client: "c",
                filter: "x/#",
            },
            Event::RetainedSet {
                node: "p3",
                message: b"\x01\x02",
            },
            Event::RetainedCleared {
                node: "p3",
                topic: "t",
            },
            Event::PodDead { node: "p4" },
            Event::PodHello { node: "p4" },
        ];
        for ev in all {
            let (tag, fields) = ev.fields();
            let mut flat = vec![
                Value::BulkString(b"t".to_vec()),
                Value::BulkString(tag.as_bytes().to_vec()),
            ];
            for (k, v) in fields {
                flat.push(Value::BulkString(k.as_bytes().to_vec()));
                flat.push(Value::BulkString(v.to_vec()));
            }
            let entry = Value::Array(vec![Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                Value::Array(flat),
            ])]);
            let list = entries(&entry);
            assert_eq!(Event::parse(&list[0]), Some(ev));
        }
        let odd = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"1-0".to_vec()),
            Value::Array(vec![
                Value::BulkString(b"t".to_vec()),
                Value::BulkString(b"o".to_vec()),
                Value::BulkString(b"n".to_vec()),
                Value::BulkString(b"p".to_vec()),
            ]),
        ])]);
        assert_eq!(Event::parse(&entries(&odd)[0]), None);
    }
}
