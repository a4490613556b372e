//! Routes and persistent subscriptions: announced to the other pods, stored for sessions.

use super::*;

impl RedisStore {
    pub(super) fn route_add_cmds(&self, full: &ByteString, cmds: &mut Vec<Cmd>) {
        let mut n = self.local_routes.lock();
        let c = n.entry(full.clone()).or_insert(0);
        *c += 1;
        if *c > 1 {
            return;
        }
        drop(n);
        self.routes.write().add_node_route(&self.node, full);
        cmds.push(on_key("SADD", &keys::routes(&self.node), full.as_bytes()));
        cmds.push(
            Event::RouteAdded {
                node: &self.node,
                filter: full,
            }
            .cmd(),
        );
        if full.starts_with("$share/") {
            cmds.push(group_create(full));
            self.shares.lock().insert(full.clone());
        }
    }

    pub(super) fn route_remove_cmds(&self, full: &ByteString, cmds: &mut Vec<Cmd>) {
        let mut n = self.local_routes.lock();
        match n.get_mut(full) {
            Some(c) if *c > 1 => {
                *c -= 1;
                return;
            }
            Some(_) => {
                n.remove(full);
            }
            None => return,
        }
        drop(n);
        self.routes.write().remove_node_route(&self.node, full);
        cmds.push(on_key("SREM", &keys::routes(&self.node), full.as_bytes()));
        cmds.push(
            Event::RouteRemoved {
                node: &self.node,
                filter: full,
            }
            .cmd(),
        );
        if full.starts_with("$share/") {
            self.shares.lock().remove(full);
            // Entries this pod still holds stay pending (claimed by a
            // member elsewhere once idle); only an empty consumer goes.
            cmds.push(del_consumer(full, &self.node));
        }
    }

    pub(super) fn psub_add_cmds(
        &self,
        client_id: &ByteString,
        full: &ByteString,
        o: SubscriptionOptions,
        sub_id: Option<u32>,
        cmds: &mut Vec<Cmd>,
    ) {
        let field = format!("{client_id}\n{full}");
        let enc = wire::encode_sub(o, sub_id);
        cmds.push(
            redis::cmd("HSET")
                .arg(keys::session(client_id))
                .arg(format!("sub:{full}"))
                .arg(&enc)
                .clone(),
        );
        if full.starts_with("$share/") {
            return;
        }
        self.routes.write().add_session(
            client_id,
            full,
            SessionSub {
                qos: o.qos,
                no_local: o.no_local,
            },
        );
        cmds.push(
            redis::cmd("HSET")
                .arg(keys::PSUBS)
                .arg(&field)
                .arg(&enc)
                .clone(),
        );
        cmds.push(
            Event::SessionSubscribed {
                node: &self.node,
                client: client_id,
                filter: full,
                options: &enc,
            }
            .cmd(),
        );
    }

    pub(super) fn psub_remove_cmds(&self, client_id: &str, full: &str, cmds: &mut Vec<Cmd>) {
        self.routes.write().remove_session(client_id, full);
        cmds.push(
            redis::cmd("HDEL")
                .arg(keys::PSUBS)
                .arg(format!("{client_id}\n{full}"))
                .clone(),
        );
        cmds.push(
            Event::SessionUnsubscribed {
                node: &self.node,
                client: client_id,
                filter: full,
            }
            .cmd(),
        );
    }

    /// A local subscription was added: announce the route (once per pod)
    /// and, for a persistent session, store it. Returns when Redis has it.
    pub async fn subscribed(
        &self,
        session: &Session,
        full: &ByteString,
        o: SubscriptionOptions,
        sub_id: Option<u32>,
        existed: bool,
        store: bool,
    ) -> Result<(), StoreError> {
        let mut cmds = Vec::new();
        if !existed {
            self.route_add_cmds(full, &mut cmds);
        }
        if store && session.is_stream_fed() {
            self.psub_add_cmds(&session.client_id, full, o, sub_id, &mut cmds);
        }
        self.run_ordered(cmds).await
    }

    pub async fn unsubscribed(&self, session: &Session, full: &ByteString) {
        let mut cmds = Vec::new();
        self.route_remove_cmds(full, &mut cmds);
        if session.is_stream_fed() {
            cmds.push(
                redis::cmd("HDEL")
                    .arg(keys::session(&session.client_id))
                    .arg(format!("sub:{full}"))
                    .clone(),
            );
            self.psub_remove_cmds(&session.client_id, full, &mut cmds);
        }
        let _ = self.run_ordered(cmds).await;
    }

    /// A local session let go of its subscriptions (ended or moved): the
    /// pod's routes shrink; persistent subscriptions stay in Redis.
    pub fn dropped_local(&self, filters: &[ByteString]) {
        let mut cmds = Vec::new();
        for f in filters {
            self.route_remove_cmds(f, &mut cmds);
        }
        self.run_later(cmds);
    }
}
