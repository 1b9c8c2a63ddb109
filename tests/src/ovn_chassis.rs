//! A real OVN node: `ovs-vswitchd` with the userspace (netdev) datapath and `ovn-controller`,
//! bound to an [`OvnCentral`]'s Southbound database, with one logical switch port whose VIF is
//! a veth into a client namespace. This is OVN's own unidling path, for the benchmarks to
//! measure side by side with unidler on the very same veth.
//!
//! ```text
//!   netns <tag>-c                              netns <tag>-n (ovs-vswitchd, ovn-controller)
//!   <tag>c 192.168.77.11/24  <== veth ==>  <tag>n  in br-int, iface-id=vif1 (switch sw0)
//!   default via 192.168.77.1 (static neighbour)
//! ```
//! Both daemons run inside the node namespace, so the bridge's own tap devices vanish with it;
//! every file is in a temp dir; everything is stopped and removed on drop.
//!
//! [`OvnNode::add_backend_pod`] adds a second port on the switch, a "pod" namespace that can
//! serve a load balancer's VIP, and a logical router as the client's gateway (as the cluster
//! router of OVN-Kubernetes is): a packet to a VIP, load-balanced on the switch, goes to the
//! router by its MAC and is routed back to the backend.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    netns::{in_netns, mac, namespaces_with_veth, sh, unique_tag},
    ovsdb_server::{CHASSIS, Listen, OvnCentral, OvsdbServer, Southbound, TempDir, run},
};

/// The Open_vSwitch schema Debian installs.
pub const VSWITCH_SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
/// The logical switch the client port is on.
pub const SWITCH: &str = "sw0";
/// The logical switch port bound to the client's veth.
pub const CLIENT_PORT: &str = "vif1";
/// The client's address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 11);
/// The client's MAC (the logical port's address).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 1, 0x11];
/// The MAC the client sends everything off-link to (its default gateway's static neighbour):
/// the load-balancing stage matches on the IP destination before any L2 lookup.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 1, 0x01];
const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// MAC of the node's veth end (an OVS port: nothing is addressed to it).
const NODE_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 1, 0x02];
/// The logical switch port bound to the backend pod's veth.
pub const BACKEND_PORT: &str = "vif2";
/// The backend pod's address.
pub const BACKEND_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 12);
/// The backend pod's MAC (its logical port's address).
pub const BACKEND_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 1, 0x12];
/// MAC of the node's end of the backend pod's veth.
const BACKEND_NODE_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 1, 0x03];

/// OVN central plus one chassis, its switch and a client namespace.
pub struct OvnNode {
    /// NB, SB and ovn-northd.
    pub central: OvnCentral,
    /// The client namespace.
    pub client_ns: String,
    /// The namespace ovs-vswitchd and ovn-controller run in.
    pub node_ns: String,
    /// The client's veth end.
    pub client_if: String,
    /// The node's veth end (an OVS port; where unidler attaches).
    pub node_if: String,
    /// The backend pod's namespace, once added.
    pub backend_ns: Option<String>,
    /// Pods added with [`OvnNode::add_pod`]: their namespaces.
    pods: Vec<String>,
    tag: String,
    // Field order is drop order: daemons first, then the Open_vSwitch database, then files.
    controller: Option<Child>,
    vswitchd: Option<Child>,
    conf: Option<OvsdbServer>,
    run_dir: TempDir,
}

impl OvnNode {
    /// Starts everything and waits until ovn-controller has bound the client port.
    #[track_caller]
    pub fn start(prefix: &str) -> Self {
        let tag = unique_tag(prefix);
        let central = OvnCentral::start();
        let mut node = OvnNode {
            central,
            client_ns: format!("{tag}-c"),
            node_ns: format!("{tag}-n"),
            client_if: format!("{tag}c"),
            node_if: format!("{tag}n"),
            backend_ns: None,
            pods: Vec::new(),
            tag: tag.clone(),
            controller: None,
            vswitchd: None,
            conf: None,
            run_dir: TempDir::new("ovnrun"),
        };
        // From here on, Drop removes whatever was made.
        namespaces_with_veth(
            (&node.client_ns, &node.client_if, CLIENT_MAC),
            (&node.node_ns, &node.node_if, NODE_MAC),
        );
        let c = |args: &[&str]| {
            let mut full = vec!["ip", "-n", node.client_ns.as_str()];
            full.extend_from_slice(args);
            sh(&full);
        };
        c(&[
            "addr",
            "add",
            &format!("{CLIENT_V4}/24"),
            "dev",
            &node.client_if,
        ]);
        c(&["link", "set", "lo", "up"]);
        c(&["link", "set", &node.client_if, "up"]);
        c(&["route", "add", "default", "via", &GATEWAY_V4.to_string()]);
        c(&[
            "neigh",
            "replace",
            &GATEWAY_V4.to_string(),
            "lladdr",
            &mac(GATEWAY_MAC),
            "dev",
            &node.client_if,
        ]);
        sh(&["ip", "-n", &node.node_ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &node.node_ns,
            "link",
            "set",
            &node.node_if,
            "up",
        ]);

        node.conf = Some(OvsdbServer::standalone(
            "conf",
            VSWITCH_SCHEMA,
            Listen::default(),
        ));
        node.vsctl(&["--no-wait", "init"]);
        node.vswitchd = Some(node.spawn_in_node(
            "ovs-vswitchd",
            &[
                node.conf_remote(),
                "--no-chdir".into(),
                format!("--log-file={}", node.file("vswitchd.log").display()),
                format!("--unixctl={}", node.file("vswitchd.ctl").display()),
            ],
        ));
        node.vsctl(&[
            "--timeout=20",
            "add-br",
            "br-int",
            "--",
            "set",
            "Bridge",
            "br-int",
            "datapath_type=netdev",
            "fail-mode=secure",
            "other-config:disable-in-band=true",
        ]);
        node.vsctl(&[
            "set",
            "Open_vSwitch",
            ".",
            &format!("external_ids:system-id={CHASSIS}"),
            &format!("external_ids:ovn-remote={}", node.central.sb.unix_remote()),
            "external_ids:ovn-encap-type=geneve",
            "external_ids:ovn-encap-ip=127.0.0.1",
            "external_ids:ovn-bridge-datapath-type=netdev",
        ]);
        node.controller = Some(node.spawn_in_node(
            "ovn-controller",
            &[
                node.conf_remote(),
                "--no-chdir".into(),
                format!("--log-file={}", node.file("controller.log").display()),
            ],
        ));
        node.central.nbctl(&[
            "ls-add",
            SWITCH,
            "--",
            "lsp-add",
            SWITCH,
            CLIENT_PORT,
            "--",
            "lsp-set-addresses",
            CLIENT_PORT,
            &format!("{} {CLIENT_V4}", mac(CLIENT_MAC)),
        ]);
        node.vsctl(&[
            "add-port",
            "br-int",
            &node.node_if,
            "--",
            "set",
            "Interface",
            &node.node_if,
            &format!("external_ids:iface-id={CLIENT_PORT}"),
        ]);
        node.wait_until_bound(CLIENT_PORT);
        node.central.nbctl(&["--wait=hv", "sync"]);
        node
    }

    /// Adds a backend pod on the switch (port [`BACKEND_PORT`], [`BACKEND_V4`]) and a logical
    /// router with the switch's gateway address, and waits until ovn-controller has bound the
    /// port. Both pods' veths compute full checksums (`tx off`): OVS's userspace conntrack
    /// calls a partial one invalid. Returns the pod's namespace.
    #[track_caller]
    pub fn add_backend_pod(&mut self) -> String {
        let pod_ns = format!("{}-b", self.tag);
        let pod_if = format!("{}b", self.tag);
        let node_side = self.backend_node_if();
        self.backend_ns = Some(pod_ns.clone());
        self.pod_namespace(
            (&pod_ns, &pod_if, BACKEND_MAC),
            (&node_side, Some(BACKEND_NODE_MAC)),
            BACKEND_V4,
        );
        let p = |args: &[&str]| {
            let mut full = vec!["ip", "-n", pod_ns.as_str()];
            full.extend_from_slice(args);
            sh(&full);
        };
        p(&["link", "set", "lo", "up"]);
        p(&["route", "add", "default", "via", &GATEWAY_V4.to_string()]);
        // The client is on-link: its MAC statically, as the logical switch knows it.
        p(&[
            "neigh",
            "replace",
            &CLIENT_V4.to_string(),
            "lladdr",
            &mac(CLIENT_MAC),
            "dev",
            &pod_if,
        ]);
        for (ns, iface) in [(&pod_ns, &pod_if), (&self.client_ns, &self.client_if)] {
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", iface, "tx", "off",
            ]);
        }
        self.central.nbctl(&[
            "lsp-add",
            SWITCH,
            BACKEND_PORT,
            "--",
            "lsp-set-addresses",
            BACKEND_PORT,
            &format!("{} {BACKEND_V4}", mac(BACKEND_MAC)),
            "--",
            "lr-add",
            "lr0",
            "--",
            "lrp-add",
            "lr0",
            "lr0-sw0",
            &mac(GATEWAY_MAC),
            &format!("{GATEWAY_V4}/24"),
            "--",
            "lsp-add",
            SWITCH,
            "sw0-lr0",
            "--",
            "lsp-set-type",
            "sw0-lr0",
            "router",
            "--",
            "lsp-set-addresses",
            "sw0-lr0",
            "router",
            "--",
            "lsp-set-options",
            "sw0-lr0",
            "router-port=lr0-sw0",
        ]);
        self.bind(&node_side, BACKEND_PORT);
        pod_ns
    }

    /// Adds a pod with logical port `port` (MAC `mac`, address `ip`) on logical switch
    /// `switch` (created if needed), its veth's node end an OVS port with that `iface-id`, and
    /// waits until ovn-controller has bound it. Returns the pod's namespace and interface.
    #[track_caller]
    pub fn add_pod(
        &mut self,
        switch: &str,
        port: &str,
        mac_addr: [u8; 6],
        ip: Ipv4Addr,
    ) -> (String, String) {
        let n = self.pods.len();
        let pod_ns = format!("{}-p{n}", self.tag);
        let (pod_if, node_side) = (format!("{}p{n}", self.tag), format!("{}q{n}", self.tag));
        self.pods.push(pod_ns.clone());
        self.pod_namespace((&pod_ns, &pod_if, mac_addr), (&node_side, None), ip);
        self.central.nbctl(&[
            "--may-exist",
            "ls-add",
            switch,
            "--",
            "lsp-add",
            switch,
            port,
            "--",
            "lsp-set-addresses",
            port,
            &format!("{} {ip}", mac(mac_addr)),
        ]);
        self.bind(&node_side, port);
        (pod_ns, pod_if)
    }

    /// Creates namespace `pod.0` with the veth end `pod.1` (MAC `pod.2`, address `ip`/24), its
    /// peer `node.0` (MAC `node.1`, if given) in the node's namespace; both up.
    #[track_caller]
    fn pod_namespace(
        &self,
        pod: (&str, &str, [u8; 6]),
        node: (&str, Option<[u8; 6]>),
        ip: Ipv4Addr,
    ) {
        let (pod_ns, pod_if, pod_mac) = pod;
        sh(&["ip", "netns", "add", pod_ns]);
        let (pod_mac, node_mac) = (mac(pod_mac), node.1.map(mac));
        let mut link = vec![
            "ip",
            "link",
            "add",
            pod_if,
            "netns",
            pod_ns,
            "address",
            &pod_mac,
            "type",
            "veth",
            "peer",
            "name",
            node.0,
            "netns",
            &self.node_ns,
        ];
        if let Some(node_mac) = &node_mac {
            link.extend(["address", node_mac.as_str()]);
        }
        sh(&link);
        let addr = format!("{ip}/24");
        sh(&["ip", "-n", pod_ns, "addr", "add", &addr, "dev", pod_if]);
        sh(&["ip", "-n", pod_ns, "link", "set", pod_if, "up"]);
        sh(&["ip", "-n", &self.node_ns, "link", "set", node.0, "up"]);
    }

    /// Makes `node_side` an OVS port bound to logical port `port` and waits until
    /// ovn-controller has bound it and the chassis has its flows.
    #[track_caller]
    fn bind(&self, node_side: &str, port: &str) {
        self.vsctl(&[
            "add-port",
            "br-int",
            node_side,
            "--",
            "set",
            "Interface",
            node_side,
            &format!("external_ids:iface-id={port}"),
        ]);
        self.wait_until_bound(port);
        self.central.nbctl(&["--timeout=120", "--wait=hv", "sync"]);
    }

    /// The node's end of the backend pod's veth (an OVS port with `iface-id` [`BACKEND_PORT`]).
    pub fn backend_node_if(&self) -> String {
        format!("{}m", self.tag)
    }

    /// Runs `f` on a thread inside the backend pod's namespace.
    pub fn in_backend<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(self.backend_ns.as_deref().expect("a backend pod"), f)
    }

    /// Adds load balancer `name` with `vips` (`IP:PORT`, no backends, TCP) and
    /// `options:event=true` to the switch, and waits until the chassis has its flows.
    #[track_caller]
    pub fn add_idle_load_balancer(&self, name: &str, vips: &[String]) {
        // One row with the whole `vips` map: a single command however many VIPs.
        let map: Vec<String> = vips.iter().map(|v| format!("\"{v}\"=\"\"")).collect();
        self.central.nbctl(&[
            "--",
            "--id=@lb",
            "create",
            "Load_Balancer",
            &format!("name={name}"),
            "protocol=tcp",
            &format!("vips={{{}}}", map.join(",")),
            "options:event=true",
            "--",
            "add",
            "Logical_Switch",
            SWITCH,
            "load_balancer",
            "@lb",
        ]);
        self.central.nbctl(&["--timeout=120", "--wait=hv", "sync"]);
    }

    /// Runs `ovs-vsctl` against the node's Open_vSwitch database.
    #[track_caller]
    pub fn vsctl(&self, args: &[&str]) -> String {
        run(Command::new("ovs-vsctl")
            .arg(format!("--db={}", self.conf_remote()))
            .args(args))
    }

    /// Packets that went to ovn-controller through the `trigger_event` flows (OpenFlow
    /// `controller` actions) matching destination `vip`: what OVN's own unidling path has seen.
    #[track_caller]
    pub fn packets_punted_for(&self, vip: std::net::IpAddr) -> u64 {
        let flows = run(Command::new("ovs-ofctl")
            .args(["-O", "OpenFlow15", "dump-flows"])
            .arg(format!("unix:{}", self.file("br-int.mgmt").display())));
        let dst = match vip {
            std::net::IpAddr::V4(v4) => format!("nw_dst={v4},"),
            std::net::IpAddr::V6(v6) => format!("ipv6_dst={v6},"),
        };
        flows
            .lines()
            .filter(|l| l.contains(&dst) && l.contains("controller("))
            .filter_map(|l| {
                l.split([',', ' '])
                    .find_map(|f| f.trim().strip_prefix("n_packets="))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }

    /// br-int's OpenFlow flows that match `needle`, as `ovs-ofctl dump-flows` prints them.
    pub fn flows_matching(&self, needle: &str) -> Vec<String> {
        run(Command::new("ovs-ofctl")
            .args(["-O", "OpenFlow15", "dump-flows"])
            .arg(format!("unix:{}", self.file("br-int.mgmt").display())))
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
    }

    /// br-int's OpenFlow management socket (`unix:PATH`), for `ovs-ofctl`.
    pub fn openflow_target(&self) -> String {
        format!("unix:{}", self.file("br-int.mgmt").display())
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.client_ns, f)
    }

    /// ovn-controller's process id.
    pub fn controller_pid(&self) -> u32 {
        self.controller.as_ref().map_or(0, Child::id)
    }

    /// ovs-vswitchd's process id.
    pub fn vswitchd_pid(&self) -> u32 {
        self.vswitchd.as_ref().map_or(0, Child::id)
    }

    /// ovn-controller's log so far.
    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.file("controller.log")).unwrap_or_default()
    }

    /// The node's Open_vSwitch database (`unix:PATH`), for an agent's `--ovs-db`.
    pub fn conf_remote(&self) -> String {
        self.conf
            .as_ref()
            .expect("Open_vSwitch database running")
            .unix_remote()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    /// Starts `program args` inside the node namespace with its run directory in our temp dir.
    #[track_caller]
    fn spawn_in_node(&self, program: &str, args: &[String]) -> Child {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns, program])
            .args(args)
            .env("OVS_RUNDIR", &self.run_dir.0)
            .env("OVN_RUNDIR", &self.run_dir.0)
            .env("OVS_DBDIR", &self.run_dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        crate::die_with_parent(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
    }

    /// Waits until ovn-controller has bound logical port `port` to this chassis.
    #[track_caller]
    fn wait_until_bound(&self, port: &str) {
        self.wait_until(&format!("ovn-controller binds {port}"), || {
            !self
                .central
                .sb
                .sbctl(&[
                    "--bare",
                    "--columns=chassis",
                    "find",
                    "Port_Binding",
                    &format!("logical_port={port}"),
                ])
                .trim()
                .is_empty()
        });
    }

    #[track_caller]
    fn wait_until(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}; ovn-controller log:\n{}",
                self.controller_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for OvnNode {
    fn drop(&mut self) {
        for child in [self.controller.take(), self.vswitchd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.conf = None;
        // Deleting the namespaces deletes the veth pair and the bridge's tap devices.
        for ns in [
            Some(&self.client_ns),
            Some(&self.node_ns),
            self.backend_ns.as_ref(),
        ]
        .into_iter()
        .flatten()
        .chain(&self.pods)
        {
            let _ = Command::new("ip").args(["netns", "delete", ns]).output();
        }
    }
}
