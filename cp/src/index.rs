//! An in-memory index of each mesh, kept current from the store's change feed, from which
//! per-dataplane configs are compiled.
//!
//! One task owns the index and applies changes; each mesh's view is published as a
//! `watch<Option<Arc<MeshView>>>` (`None` while the mesh does not exist). A change rebuilds
//! only what it touches: a Dataplane change rebuilds the endpoint lists of the services it
//! had or has, and every other list keeps its `Arc`, so a session can tell in O(1) whether
//! anything it depends on changed (`Arc::ptr_eq`) before compiling anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::insight::{self, INSIGHT_KIND};
use crate::meshca::{self, CA_KIND, MeshCas};
use crate::model::{InboundState, Kind, Resource, Spec};
use crate::store::{Change, ResourceKey, Store};

#[cfg(test)]
mod tests;

/// One instance of a service: an inbound of some dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The dataplane that serves it.
    pub dataplane: String,
    /// Where other dataplanes reach it.
    pub address: String,
    /// Its inbound port.
    pub port: u32,
    /// Its inbound tags.
    pub tags: BTreeMap<String, String>,
    /// Ready: not marked NotReady in the Dataplane, and not reported unready by its dataplane.
    pub healthy: bool,
    /// Its `kuma.io/zone` tag, empty in a single zone.
    pub zone: String,
}

/// Everything configs of one mesh are compiled from.
#[derive(Debug, Clone)]
pub struct MeshView {
    /// The Mesh.
    pub mesh: Arc<Resource>,
    /// Its CAs; `None` without mTLS (or when they failed to load: see `ca_error`).
    pub cas: Option<Arc<MeshCas>>,
    /// Why the enabled CA could not be loaded.
    pub ca_error: Option<String>,
    /// The mesh's Dataplanes by name.
    pub dataplanes: BTreeMap<String, Arc<Resource>>,
    /// The mesh's MeshTrafficPermissions, sorted by name.
    pub mtps: Arc<Vec<Arc<Resource>>>,
    /// The mesh's MeshLoadBalancingStrategies, sorted by name.
    pub mlbs: Arc<Vec<Arc<Resource>>>,
    /// Instances of each service.
    pub endpoints: BTreeMap<String, Arc<Vec<EndpointInfo>>>,
}

#[derive(Default)]
struct MeshState {
    mesh: Option<Arc<Resource>>,
    cas: Option<Arc<MeshCas>>,
    ca_error: Option<String>,
    dataplanes: BTreeMap<String, Arc<Resource>>,
    mtps: Arc<Vec<Arc<Resource>>>,
    mlbs: Arc<Vec<Arc<Resource>>>,
    health: BTreeMap<String, BTreeMap<u32, bool>>,
    endpoints: BTreeMap<String, Arc<Vec<EndpointInfo>>>,
}

impl MeshState {
    fn view(&self) -> Option<Arc<MeshView>> {
        Some(Arc::new(MeshView {
            mesh: self.mesh.clone()?,
            cas: self.cas.clone(),
            ca_error: self.ca_error.clone(),
            dataplanes: self.dataplanes.clone(),
            mtps: self.mtps.clone(),
            mlbs: self.mlbs.clone(),
            endpoints: self.endpoints.clone(),
        }))
    }

    fn services_of(&self, dp: &str) -> BTreeSet<String> {
        self.dataplanes
            .get(dp)
            .and_then(|r| r.dataplane())
            .map(|d| d.services().into_iter().collect())
            .unwrap_or_default()
    }

    fn rebuild_endpoints(&mut self, services: &BTreeSet<String>) {
        for svc in services {
            let list = endpoints_of(svc, &self.dataplanes, &self.health);
            if list.is_empty() {
                self.endpoints.remove(svc);
            } else if self.endpoints.get(svc).is_none_or(|old| **old != list) {
                self.endpoints.insert(svc.clone(), Arc::new(list));
            }
        }
    }
}

/// The endpoints of `service` among `dataplanes`, in dataplane-name order.
pub fn endpoints_of(
    service: &str,
    dataplanes: &BTreeMap<String, Arc<Resource>>,
    health: &BTreeMap<String, BTreeMap<u32, bool>>,
) -> Vec<EndpointInfo> {
    let mut out = Vec::new();
    for (name, r) in dataplanes {
        let Some(dp) = r.dataplane() else { continue };
        let net = &dp.networking;
        for ib in dp.inbounds() {
            if ib.service() != Some(service) || ib.state == Some(InboundState::Ignored) {
                continue;
            }
            let Ok(port) = u32::try_from(ib.port) else {
                continue;
            };
            let reported = health
                .get(name)
                .and_then(|h| h.get(&port))
                .copied()
                .unwrap_or(true);
            let address = net
                .advertised_address
                .clone()
                .or_else(|| ib.address.clone())
                .unwrap_or_else(|| net.address.clone());
            out.push(EndpointInfo {
                dataplane: name.clone(),
                address,
                port,
                tags: ib.tags().clone(),
                healthy: reported && ib.state != Some(InboundState::NotReady),
                zone: ib.tags().get("kuma.io/zone").cloned().unwrap_or_default(),
            });
        }
    }
    out
}

/// The index: subscribe to a mesh, or read its current view.
pub struct Index {
    store: Arc<dyn Store>,
    meshes: Mutex<HashMap<String, watch::Sender<Option<Arc<MeshView>>>>>,
}

impl Index {
    /// An empty index over `store`; call [`Index::run`] to fill and maintain it.
    pub fn new(store: Arc<dyn Store>) -> Arc<Index> {
        Arc::new(Index {
            store,
            meshes: Mutex::new(HashMap::new()),
        })
    }

    fn sender(&self, mesh: &str) -> watch::Sender<Option<Arc<MeshView>>> {
        // Poisoning only follows a panic in this short, non-panicking critical section.
        let mut map = self.meshes.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(mesh.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// A receiver of `mesh`'s view (`None` while the mesh does not exist).
    pub fn subscribe(&self, mesh: &str) -> watch::Receiver<Option<Arc<MeshView>>> {
        self.sender(mesh).subscribe()
    }

    /// `mesh`'s current view.
    pub fn view(&self, mesh: &str) -> Option<Arc<MeshView>> {
        self.sender(mesh).borrow().clone()
    }

    /// Loads every mesh, then applies the store's changes until the feed closes or `ready`'s
    /// receivers are gone. `ready` is sent once the first full load is published.
    pub async fn run(self: Arc<Self>, ready: tokio::sync::oneshot::Sender<()>) {
        let mut feed = self.store.subscribe();
        let mut state: HashMap<String, MeshState> = HashMap::new();
        self.full_load(&mut state).await;
        let _ = ready.send(());
        loop {
            let first = match feed.recv().await {
                Ok(c) => c,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "index fell behind the change feed; reloading");
                    self.full_load(&mut state).await;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            // Batch whatever else is queued: one publication per mesh per batch.
            let mut batch = vec![first];
            let mut lagged = false;
            loop {
                match feed.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                    Err(_) => break,
                }
            }
            if lagged {
                self.full_load(&mut state).await;
                continue;
            }
            let mut touched = BTreeSet::new();
            for c in batch {
                if let Some(mesh) = self.apply(&mut state, c).await {
                    touched.insert(mesh);
                }
            }
            for mesh in touched {
                let view = state.get(&mesh).and_then(MeshState::view);
                self.sender(&mesh).send_replace(view);
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> T + Send + 'static,
    ) -> Option<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .ok()
    }

    async fn full_load(&self, state: &mut HashMap<String, MeshState>) {
        let loaded = self
            .blocking(|s| -> Result<_, crate::store::Error> {
                let meshes = s.list(Kind::Mesh.type_name(), None)?;
                let dps = s.list(Kind::Dataplane.type_name(), None)?;
                let mtps = s.list(Kind::MeshTrafficPermission.type_name(), None)?;
                let mlbs = s.list(Kind::MeshLoadBalancingStrategy.type_name(), None)?;
                let insights = insight::load_all(s, None).unwrap_or_default();
                Ok((meshes, dps, mtps, mlbs, insights))
            })
            .await;
        let Some(Ok((meshes, dps, mtps, mlbs, insights))) = loaded else {
            tracing::error!("index: the store could not be read; keeping the previous views");
            return;
        };
        let names: Vec<String> = state.keys().cloned().collect();
        state.clear();
        for m in meshes {
            let Some(r) = parse(&m.body) else { continue };
            let st = state.entry(m.key.name.clone()).or_default();
            st.mesh = Some(Arc::new(r));
        }
        for d in dps {
            if let (Some(st), Some(r)) = (state.get_mut(&d.key.mesh), parse(&d.body)) {
                st.dataplanes.insert(d.key.name.clone(), Arc::new(r));
            }
        }
        for p in mtps {
            if let (Some(st), Some(r)) = (state.get_mut(&p.key.mesh), parse(&p.body)) {
                Arc::make_mut(&mut st.mtps).push(Arc::new(r));
            }
        }
        for p in mlbs {
            if let (Some(st), Some(r)) = (state.get_mut(&p.key.mesh), parse(&p.body)) {
                Arc::make_mut(&mut st.mlbs).push(Arc::new(r));
            }
        }
        for ((mesh, name), i) in insights {
            if let Some(st) = state.get_mut(&mesh) {
                st.health.insert(name, i.inbound_health);
            }
        }
        let mesh_names: Vec<String> = state.keys().cloned().collect();
        for mesh in &mesh_names {
            self.reload_cas(state, mesh).await;
            if let Some(st) = state.get_mut(mesh) {
                let services = st
                    .dataplanes
                    .keys()
                    .flat_map(|d| st.services_of(d))
                    .collect();
                st.rebuild_endpoints(&services);
            }
        }
        for mesh in names.iter().chain(&mesh_names) {
            let view = state.get(mesh).and_then(MeshState::view);
            self.sender(mesh).send_replace(view);
        }
    }

    async fn reload_cas(&self, state: &mut HashMap<String, MeshState>, mesh: &str) {
        let Some(st) = state.get_mut(mesh) else {
            return;
        };
        let Some(Spec::Mesh(spec)) = st.mesh.as_ref().map(|m| m.spec.clone()) else {
            return;
        };
        let name = mesh.to_owned();
        let loaded = self.blocking(move |s| meshca::load(s, &name, &spec)).await;
        match loaded {
            Some(Ok(cas)) => {
                st.cas = cas;
                st.ca_error = None;
            }
            Some(Err(e)) => {
                tracing::error!(mesh, error = %e, "cannot load the mesh's CA; keeping the previous one");
                st.ca_error = Some(e.to_string());
            }
            None => {}
        }
    }

    /// Applies one change; returns the mesh whose view changed.
    async fn apply(&self, state: &mut HashMap<String, MeshState>, c: Change) -> Option<String> {
        let key = c.key;
        let kind = key.kind.as_str();
        if kind == Kind::Mesh.type_name() {
            let body = self.read(&key).await;
            match body.and_then(|b| parse(&b)) {
                Some(r) => {
                    let st = state.entry(key.name.clone()).or_default();
                    let changed_spec = st.mesh.as_ref().is_none_or(|m| m.spec != r.spec);
                    st.mesh = Some(Arc::new(r));
                    if changed_spec {
                        self.reload_cas(state, &key.name).await;
                    }
                }
                None => {
                    state.remove(&key.name);
                }
            }
            return Some(key.name);
        }
        let mesh = key.mesh.clone();
        if !state.contains_key(&mesh) {
            return None;
        }
        if kind == Kind::Dataplane.type_name() {
            let body = self.read(&key).await;
            let st = state.get_mut(&mesh)?;
            let mut services = st.services_of(&key.name);
            match body.and_then(|b| parse(&b)) {
                Some(r) => {
                    st.dataplanes.insert(key.name.clone(), Arc::new(r));
                }
                None => {
                    st.dataplanes.remove(&key.name);
                    st.health.remove(&key.name);
                }
            }
            services.extend(st.services_of(&key.name));
            st.rebuild_endpoints(&services);
        } else if kind == Kind::MeshTrafficPermission.type_name()
            || kind == Kind::MeshLoadBalancingStrategy.type_name()
        {
            let body = self.read(&key).await;
            let st = state.get_mut(&mesh)?;
            let list = if kind == Kind::MeshTrafficPermission.type_name() {
                &mut st.mtps
            } else {
                &mut st.mlbs
            };
            let mut next: Vec<Arc<Resource>> = list
                .iter()
                .filter(|p| p.name != key.name)
                .cloned()
                .collect();
            if let Some(r) = body.and_then(|b| parse(&b)) {
                next.push(Arc::new(r));
                next.sort_by(|a, b| a.name.cmp(&b.name));
            }
            *list = Arc::new(next);
        } else if kind == INSIGHT_KIND {
            let body = self.read(&key).await;
            let health = body
                .and_then(|b| serde_json::from_slice::<insight::Insight>(&b).ok())
                .map(|i| i.inbound_health)
                .unwrap_or_default();
            let st = state.get_mut(&mesh)?;
            if st.health.get(&key.name).is_some_and(|h| *h == health)
                || (health.is_empty() && !st.health.contains_key(&key.name))
            {
                return None;
            }
            st.health.insert(key.name.clone(), health);
            let services = st.services_of(&key.name);
            st.rebuild_endpoints(&services);
        } else if kind == CA_KIND {
            // Roots are generated by this index or a concurrent Certify; reload to be sure.
            self.reload_cas(state, &mesh).await;
        } else {
            return None;
        }
        Some(mesh)
    }

    async fn read(&self, key: &ResourceKey) -> Option<Vec<u8>> {
        let k = key.clone();
        self.blocking(move |s| s.get(&k).ok().flatten().map(|r| r.body))
            .await
            .flatten()
    }
}

fn parse(body: &[u8]) -> Option<Resource> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Resource::from_json(&v).ok()
}
