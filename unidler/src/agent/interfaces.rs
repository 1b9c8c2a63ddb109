//! The interfaces the agent is on: those named with `--iface` (which must take the program),
//! those it follows (`--iface` patterns, OVN's VIFs and uplinks), what an earlier agent left
//! pinned, and each one's scope (its logical datapath, for scoped VIPs).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, atomic::Ordering},
};

use anyhow::Result;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    datapath::{self, Datapath, Hook},
    event::iface_name,
    ovn::{
        ovs_interfaces::{InterfaceNames, OvnInterfaces},
        vips::PortScopes,
    },
    telemetry::{InterfaceRow, Readiness, metrics::AgentMetrics},
};

/// The interfaces followed and attached to, with their scopes.
pub(super) struct Interfaces {
    /// Which hook the program is attached with.
    hook: Hook,
    /// Names of the interfaces attached to, by ifindex.
    names: HashMap<u32, String>,
    /// Interfaces the program should be on and is not (their attachment died with them),
    /// with whether a failure to attach again was logged.
    detached: BTreeMap<String, bool>,
    /// Interface name patterns to follow.
    patterns: Vec<glob::Pattern>,
    /// Interfaces named with `--iface`.
    named: Vec<String>,
    /// OVN's interfaces to follow (VIFs, uplinks; from the local Open_vSwitch database).
    vifs: InterfaceNames,
    /// The VIFs' logical ports (`iface-id`), by interface name.
    iface_ids: BTreeMap<String, String>,
    /// The local logical ports' scopes, from the OVN VIP source.
    port_scopes: Option<watch::Receiver<Arc<PortScopes>>>,
    /// The scope written to the kernel for each attached interface that has one.
    scopes: HashMap<u32, u32>,
    /// Followed interfaces that refused the program, by name, with the ifindex that refused
    /// (tried again only if the interface is re-created).
    refused: HashMap<String, u32>,
    readiness: Arc<Readiness>,
    metrics: AgentMetrics,
}

impl Interfaces {
    /// None attached yet: `named` must take the program, `patterns` are followed, and, with
    /// VIPs from OVN, interfaces are scoped by `port_scopes`.
    pub(super) fn new(
        hook: Hook,
        named: Vec<String>,
        patterns: Vec<glob::Pattern>,
        port_scopes: Option<watch::Receiver<Arc<PortScopes>>>,
        readiness: Arc<Readiness>,
        metrics: AgentMetrics,
    ) -> Self {
        Self {
            hook,
            names: HashMap::new(),
            detached: BTreeMap::new(),
            patterns,
            named,
            vifs: InterfaceNames::new(),
            iface_ids: BTreeMap::new(),
            port_scopes,
            scopes: HashMap::new(),
            refused: HashMap::new(),
            readiness,
            metrics,
        }
    }

    /// Takes over what an earlier agent left pinned (its attachments now run this agent's
    /// program), then attaches to every named interface: each must take the program.
    pub(super) fn attach_named(&mut self, datapath: &mut Datapath) -> Result<()> {
        for (iface, ifindex, hook) in datapath.adopt_pinned_links() {
            info!(%iface, ifindex, hook = hook.name(), "adopted the pinned attachment (program replaced atomically)");
            self.names.insert(ifindex, iface);
        }
        for iface in &self.named {
            if self.names.values().any(|n| n == iface) {
                continue;
            }
            let (ifindex, hook) = datapath.attach(iface, self.hook)?;
            info!(iface, ifindex, hook = hook.name(), "datapath attached");
            self.names.insert(ifindex, iface.clone());
        }
        Ok(())
    }

    /// The name of interface `ifindex`, as attached, or as the kernel says now.
    pub(super) fn name_of(&self, ifindex: u32) -> String {
        self.names
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| iface_name(ifindex))
    }

    /// The scope written for interface `ifindex`, if it has one.
    pub(super) fn scope_of(&self, ifindex: u32) -> Option<u32> {
        self.scopes.get(&ifindex).copied()
    }

    /// The interfaces table for `unidler interfaces`, sorted by name.
    pub(super) fn rows(&self, datapath: &Datapath) -> Vec<InterfaceRow> {
        let mut rows: Vec<InterfaceRow> = datapath
            .attached()
            .map(|(iface, ifindex, hook)| InterfaceRow {
                iface: iface.to_owned(),
                ifindex,
                hook: hook.name().to_owned(),
                attachment: datapath.attachment_kind(iface).unwrap_or_default(),
                scope: self.scope_of(ifindex),
            })
            .collect();
        rows.sort_by(|a, b| a.iface.cmp(&b.iface));
        rows
    }

    /// An interface attached to that is gone or was re-created under its name (a pod's
    /// veth, say) lost the program with its old ifindex: the program is attached again
    /// wherever that name is now; until then the agent is not ready and says which.
    pub(super) fn on_due(&mut self, datapath: &mut Datapath) {
        for (iface, old, _) in datapath.stale_attachments() {
            self.names.remove(&old);
            datapath.forget_attachment(&iface);
            if self.is_followed(&iface) {
                // A followed interface that left: nothing is missing (pods come and go).
                debug!(%iface, ifindex = old, "interface gone: detached");
                continue;
            }
            warn!(%iface, ifindex = old, "interface gone or re-created: its XDP program went with it");
            self.detached.insert(iface, false);
        }
        self.follow(datapath);
        self.sync_scopes(datapath);
        if self.detached.is_empty() {
            self.publish(datapath);
            return;
        }
        for (iface, warned) in std::mem::take(&mut self.detached) {
            if datapath::ifindex_of(&iface).is_err() {
                self.detached.insert(iface, warned);
                continue;
            }
            match datapath.attach(&iface, self.hook) {
                Ok((ifindex, hook)) => {
                    info!(%iface, ifindex, hook = hook.name(), "XDP program attached again");
                    self.names.insert(ifindex, iface);
                }
                Err(e) => {
                    if !warned {
                        warn!(%iface, "the XDP program could not be attached again: {e}");
                        self.metrics.attach_failures.inc();
                    }
                    self.detached.insert(iface, true);
                }
            }
        }
        *self
            .readiness
            .detached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            self.detached.keys().cloned().collect();
        self.publish(datapath);
    }

    /// OVN's interfaces changed: attach to new ones at once (a pod's first packet may follow
    /// its port by milliseconds), detach from those that left OVS.
    pub(super) fn on_vifs(&mut self, interfaces: OvnInterfaces, datapath: &mut Datapath) {
        let OvnInterfaces { names, iface_ids } = interfaces;
        let left: Vec<String> = self.vifs.difference(&names).cloned().collect();
        self.vifs = names;
        self.iface_ids = iface_ids;
        for iface in left {
            if self.patterns.iter().any(|p| p.matches(&iface)) {
                continue;
            }
            let attached = datapath
                .attached()
                .find(|(n, _, _)| *n == iface)
                .map(|(_, ifindex, _)| ifindex);
            if let Some(ifindex) = attached {
                self.names.remove(&ifindex);
                datapath.forget_attachment(&iface);
                debug!(%iface, "no longer one of OVN's interfaces: detached");
            }
            self.refused.remove(&iface);
        }
        self.prune_adopted(datapath);
        self.follow(datapath);
        self.sync_scopes(datapath);
    }

    /// Gives each attached VIF the scope of its logical port (the tunnel key of its logical
    /// switch), and each uplink its gateway router's, so that scoped VIPs are judged by the
    /// load balancers there; takes it from interfaces that lost it or went.
    pub(super) fn sync_scopes(&mut self, datapath: &mut Datapath) {
        let Some(port_scopes) = &self.port_scopes else {
            return;
        };
        let port_scopes = port_scopes.borrow().clone();
        let wanted: HashMap<u32, u32> = datapath
            .attached()
            .filter_map(|(iface, ifindex, _)| {
                let scope = match self.iface_ids.get(iface) {
                    Some(port) => port_scopes.ports.get(port).copied(),
                    // One of OVN's interfaces without a logical port: an uplink, which leads
                    // to the gateway router.
                    None if self.vifs.contains(iface) => port_scopes.gateway,
                    None => None,
                };
                Some((ifindex, scope?))
            })
            .collect();
        let stale: Vec<u32> = self
            .scopes
            .keys()
            .filter(|i| !wanted.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            match datapath.set_iface_scope(ifindex, None) {
                Ok(()) => {
                    self.scopes.remove(&ifindex);
                }
                Err(e) => warn!(ifindex, "clearing an interface's scope failed: {e}"),
            }
        }
        for (ifindex, scope) in wanted {
            if self.scopes.get(&ifindex) == Some(&scope) {
                continue;
            }
            match datapath.set_iface_scope(ifindex, Some(scope)) {
                Ok(()) => {
                    debug!(ifindex, scope, "interface scoped to its logical datapath");
                    self.scopes.insert(ifindex, scope);
                }
                Err(e) => warn!(ifindex, scope, "setting an interface's scope failed: {e}"),
            }
        }
    }

    /// Detaches what an earlier agent left pinned on interfaces this one does not want (not
    /// named, matching no pattern, not one of OVN's interfaces now).
    pub(super) fn prune_adopted(&mut self, datapath: &mut Datapath) {
        let unwanted: Vec<(String, u32)> = datapath
            .attached()
            .filter(|(iface, _, _)| {
                !self.named.iter().any(|n| n == iface) && !self.is_followed(iface)
            })
            .map(|(iface, ifindex, _)| (iface.to_owned(), ifindex))
            .collect();
        for (iface, ifindex) in unwanted {
            self.names.remove(&ifindex);
            datapath.forget_attachment(&iface);
            info!(%iface, "attachment left by an earlier agent is not wanted here: detached");
        }
    }

    /// Attaches to every followed interface (matching an `--iface` pattern, or one of OVN's
    /// interfaces) that does not have the program yet. An interface that refuses it (a
    /// driver without XDP, someone else's program) is logged and counted once, and tried
    /// again only if it is re-created; the agent goes on.
    pub(super) fn follow(&mut self, datapath: &mut Datapath) {
        if self.patterns.is_empty() && self.vifs.is_empty() {
            self.publish(datapath);
            return;
        }
        let attached: HashSet<String> = datapath
            .attached()
            .map(|(name, _, _)| name.to_owned())
            .collect();
        let present = datapath::interfaces();
        self.refused
            .retain(|name, index| present.iter().any(|(i, n)| n == name && i == index));
        for (ifindex, iface) in present {
            if attached.contains(&iface)
                || self.refused.contains_key(&iface)
                || !self.is_followed(&iface)
            {
                continue;
            }
            match datapath.attach(&iface, self.hook) {
                Ok((ifindex, hook)) => {
                    // Pods come and go: one line each at debug; the count is a metric.
                    debug!(%iface, ifindex, hook = hook.name(), "datapath attached to a followed interface (--iface pattern or OVN VIF)");
                    self.names.insert(ifindex, iface);
                }
                Err(e) => {
                    warn!(%iface, "the XDP program could not be attached: {e}");
                    self.metrics.attach_failures.inc();
                    self.refused.insert(iface, ifindex);
                }
            }
        }
        self.publish(datapath);
    }

    /// Whether `iface` is followed (a pattern or an OVN VIF) rather than named.
    fn is_followed(&self, iface: &str) -> bool {
        self.vifs.contains(iface) || self.patterns.iter().any(|p| p.matches(iface))
    }

    /// The attachment gauges.
    fn publish(&self, datapath: &Datapath) {
        let attached = datapath.attached().count();
        self.metrics
            .set_attachments(attached, self.detached.len() + self.refused.len());
        self.readiness.interfaces.store(attached, Ordering::Relaxed);
    }
}
