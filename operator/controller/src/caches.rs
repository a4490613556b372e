//! The operator's view of users, Secrets and brokers: reflector stores kept
//! by one watch each, so that a reconcile reads what it needs from memory
//! instead of listing users and getting Secrets from the API server (which,
//! with tens of thousands of users, would be a list of all of them per
//! event).
//!
//! The same watches wake the broker controller: a user or Secret event is
//! mapped to the brokers it matters to as it arrives, after the store took
//! it in (so a reconcile never reads an older object than the one that woke
//! it), and those brokers are queued once each however many events named
//! them ([`Wake`]). Nothing here waits for the controller, so a burst of
//! thousands of events never slows a watch into being dropped and listed
//! again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use cirrus_operator_api::{MqttBroker, MqttUser};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The stores.
pub struct Caches {
    pub users: Store<MqttUser>,
    pub secrets: Store<Secret>,
    pub brokers: Store<MqttBroker>,
}

/// In order, and as a set (so that each is queued once).
type Pending = (
    VecDeque<ObjectRef<MqttBroker>>,
    HashSet<ObjectRef<MqttBroker>>,
);

/// Brokers waiting for a reconcile, each once (bounded by the number of
/// brokers).
#[derive(Default)]
pub struct Wake {
    pending: parking_lot::Mutex<Pending>,
    notify: Notify,
}

impl Wake {
    pub fn push(&self, r: ObjectRef<MqttBroker>) {
        let mut p = self.pending.lock();
        if p.1.insert(r.clone()) {
            p.0.push_back(r);
        }
        drop(p);
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<ObjectRef<MqttBroker>> {
        let mut p = self.pending.lock();
        let r = p.0.pop_front()?;
        p.1.remove(&r);
        Some(r)
    }

    /// The brokers to reconcile, as they come, until `stop`.
    pub fn stream(
        self: Arc<Self>,
        stop: CancellationToken,
    ) -> impl Stream<Item = ObjectRef<MqttBroker>> + Send + 'static {
        futures_util::stream::unfold((self, stop), |(w, stop)| async move {
            loop {
                if let Some(r) = w.pop() {
                    return Some((r, (w, stop)));
                }
                tokio::select! {
                    _ = w.notify.notified() => {}
                    _ = stop.cancelled() => return None,
                }
            }
        })
    }
}

impl Caches {
    /// Stores with nothing in them, never filled (before the controllers
    /// start).
    pub fn empty() -> Caches {
        Caches {
            users: reflector::store().0,
            secrets: reflector::store().0,
            brokers: reflector::store().0,
        }
    }

    /// Start watching users, Secrets and brokers in the context's scope
    /// until `stop`: the stores, and the brokers their events wake.
    pub fn start(ctx: &Arc<crate::Context>, stop: &CancellationToken) -> (Arc<Caches>, Arc<Wake>) {
        let (users, users_w) = reflector::store::<MqttUser>();
        let (secrets, secrets_w) = reflector::store::<Secret>();
        let (brokers, brokers_w) = reflector::store::<MqttBroker>();
        let caches = Arc::new(Caches {
            users,
            secrets,
            brokers,
        });
        let wake = Arc::new(Wake::default());
        let w = wake.clone();
        drive(
            users_w,
            ctx.scoped::<MqttUser>(),
            stop.clone(),
            move |u: &MqttUser| {
                if let Some(ns) = u.namespace() {
                    w.push(ObjectRef::new(&u.spec.broker_ref).within(&ns));
                }
            },
        );
        let (w, c, cx) = (wake.clone(), caches.clone(), ctx.clone());
        drive(
            secrets_w,
            ctx.scoped::<Secret>(),
            stop.clone(),
            move |s: &Secret| {
                if !crate::broker::own_auth_write(&cx, s) {
                    for r in crate::broker::secret_readers(s, &c.brokers, &c.users) {
                        w.push(r);
                    }
                }
            },
        );
        drive(
            brokers_w,
            ctx.scoped::<MqttBroker>(),
            stop.clone(),
            |_: &MqttBroker| {},
        );
        (caches, wake)
    }

    /// Until both stores hold their first full list (or `stop`): a
    /// reconcile before that would see no users and write an empty auth
    /// file. False when stopped first.
    pub async fn ready(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            r = async {
                self.users.wait_until_ready().await.is_ok()
                    && self.secrets.wait_until_ready().await.is_ok()
                    && self.brokers.wait_until_ready().await.is_ok()
            } => r,
        }
    }

    /// The Secret `name` in `ns`, from the store.
    pub fn secret(&self, ns: &str, name: &str) -> Option<Arc<Secret>> {
        self.secrets.get(&ObjectRef::new(name).within(ns))
    }
}

/// One watch of `api` into a store until `stop`, with `changed` called for
/// each object that changed once the store has it: its generation moved
/// (for kinds that have one: a status write or a label is no change here)
/// or, without one, its resourceVersion; and for each deletion. Managed
/// fields are not kept (they are most of a small object's size and nothing
/// here reads them).
fn drive<K>(
    writer: reflector::store::Writer<K>,
    api: kube::Api<K>,
    stop: CancellationToken,
    mut changed: impl FnMut(&K) + Send + 'static,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let events = reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(|o: &mut K| o.managed_fields_mut().clear()),
    )
    .default_backoff();
    tokio::spawn(async move {
        let mut seen: HashMap<String, String> = HashMap::new();
        let run = events.for_each(|e| {
            match e {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    let m = o.meta();
                    let version = match m.generation {
                        Some(g) => g.to_string(),
                        None => m.resource_version.clone().unwrap_or_default(),
                    };
                    let uid = m.uid.clone().unwrap_or_default();
                    if seen.insert(uid, version.clone()).as_ref() != Some(&version) {
                        changed(&o);
                    }
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(o.meta().uid.as_deref().unwrap_or_default());
                    changed(&o);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying")
                }
            }
            futures_util::future::ready(())
        });
        tokio::select! {
            _ = run => {}
            _ = stop.cancelled() => {}
        }
    });
}
