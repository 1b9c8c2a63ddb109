//! The Kubernetes manifests as operators apply them: every overlay renders with `kubectl
//! kustomize` and validates against Kubernetes' schemas (offline, `kubernetes-validate
//! --strict`, installed by `cargo xtask setup`); the resources Kubernetes has no schema for
//! (Prometheus Operator, OpenShift) are checked here; every PromQL expression of the alerts and
//! the dashboard parses. (That each metric they name exists is checked against a running
//! agent's scrape in `telemetry.rs`.)

#[path = "../monitoring/mod.rs"]
mod monitoring;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn kubernetes_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// `kubectl kustomize dir`, as YAML.
fn render(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (with kustomize) must be installed to test the manifests");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The kinds the schemas of Kubernetes itself do not cover.
const CUSTOM_KINDS: [&str; 3] = ["PodMonitor", "PrometheusRule", "SecurityContextConstraints"];

/// Validates `yaml` with `kubernetes-validate --strict` (unknown fields are errors); only the
/// custom kinds may lack a schema.
fn validate(name: &str, yaml: &str) {
    let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/kubernetes-validate/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "{} is missing: `cargo xtask setup` (or `cargo xtask test`) installs it",
        tool.display()
    );
    let dir = std::env::temp_dir().join(format!("unidler-manifests-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(&tool)
        .arg("--strict")
        .arg(&file)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{name}:\n{report}");
    for line in report.lines().filter(|l| !l.starts_with("INFO")) {
        assert!(
            line.starts_with("WARN")
                && line.contains("Couldn't find schema for kind")
                && CUSTOM_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("kind {k} "))),
            "{name}: {line}"
        );
    }
}

/// The rendered documents, as JSON values (through the tool's Python, which has PyYAML).
fn documents(yaml: &str) -> Vec<Value> {
    let python =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/kubernetes-validate/bin/python");
    let mut child = Command::new(python)
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(sys.stdin))))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The agent's settings in the rendered ConfigMap.
fn settings(docs: &[Value]) -> &serde_json::Map<String, Value> {
    let daemonset = the_agent(docs);
    let name = &daemonset["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]
        ["name"];
    of_kind(docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == *name)
        .unwrap_or_else(|| panic!("no ConfigMap {name}"))["data"]
        .as_object()
        .unwrap()
}

fn the_agent(docs: &[Value]) -> &Value {
    of_kind(docs, "DaemonSet")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "unidler")
        .expect("the agent's DaemonSet")
}

/// The host path behind `path` in the agent's container: the hostPath volume mounted at the
/// longest mount path that holds it, and the rest of `path` below that.
fn host_path_of(daemonset: &Value, path: &str) -> Option<String> {
    let spec = &daemonset["spec"]["template"]["spec"];
    let (mount, volume) = spec["containers"][0]["volumeMounts"]
        .as_array()?
        .iter()
        .filter_map(|m| {
            let at = m["mountPath"].as_str()?.trim_end_matches('/');
            path.strip_prefix(at)
                .filter(|rest| rest.starts_with('/'))
                .map(|_| (at.to_owned(), m["name"].as_str().unwrap().to_owned()))
        })
        .max_by_key(|(at, _)| at.len())?;
    let host = spec["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == volume.as_str())?["hostPath"]["path"]
        .as_str()?
        .to_owned();
    Some(format!("{host}{}", &path[mount.len()..]))
}

/// What every rendering of the agent must be: least privilege, probes, the PodMonitor
/// selecting its pods by a port it has, no namespace but the overlay's.
fn check_agent(overlay: &str, docs: &[Value]) {
    let daemonset = the_agent(docs);
    let pod = &daemonset["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false, "{overlay}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{overlay}");
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["BPF", "PERFMON", "NET_ADMIN"]),
        "{overlay}: exactly the three capabilities the agent needs"
    );
    assert_eq!(pod["spec"]["hostNetwork"], true);
    assert_eq!(
        pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux",
        "{overlay}: no pods on Windows nodes"
    );
    let [namespace] = of_kind(docs, "Namespace")[..] else {
        panic!("{overlay}: one Namespace")
    };
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "{overlay}: host network and directories need the privileged Pod Security level"
    );
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert!(
        daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_string(),
        "{overlay}"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{overlay}");
    }
    // Every address, so that IPv6 nodes work too (no $(NODE_IP):PORT).
    let settings = settings(docs);
    assert_eq!(settings["UNIDLER_METRICS_ADDR"], ":9477", "{overlay}");
    assert_eq!(settings["UNIDLER_PIN_DIR"], "/sys/fs/bpf/unidler");
    // One namespace, the overlay's, on every namespaced resource.
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap();
        if !["Namespace", "ClusterRole", "SecurityContextConstraints"].contains(&kind) {
            assert_eq!(doc["metadata"]["namespace"], "unidler", "{overlay}: {kind}");
        }
    }
    let [monitor] = of_kind(docs, "PodMonitor")[..] else {
        panic!("{overlay}: one PodMonitor")
    };
    let labels = pod["metadata"]["labels"].as_object().unwrap();
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            labels.get(key),
            Some(value),
            "{overlay}: PodMonitor selects {key}"
        );
    }
    let port = &monitor["spec"]["podMetricsEndpoints"][0]["port"];
    assert!(
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == *port),
        "{overlay}: the PodMonitor's port {port} is the container's"
    );
    assert_eq!(of_kind(docs, "PrometheusRule").len(), 1, "{overlay}");
}

#[test]
fn every_overlay_renders_validates_and_fits_its_mode() {
    // Each mode's Southbound database, and where its socket is on the host.
    for (overlay, southbound, socket_on_host) in [
        (
            "interconnect",
            "unix:/var/run/openvswitch/ovnsb_db.sock",
            Some("/var/run/openvswitch/ovnsb_db.sock"),
        ),
        (
            "central",
            "ssl:ovnkube-db.ovn-kubernetes.svc.cluster.local:6642",
            None,
        ),
        (
            "openshift",
            "unix:/var/run/ovn/ovnsb_db.sock",
            Some("/var/run/ovn-ic/ovnsb_db.sock"),
        ),
    ] {
        let yaml = render(&kubernetes_dir().join("overlays").join(overlay));
        validate(overlay, &yaml);
        let docs = documents(&yaml);
        check_agent(overlay, &docs);
        assert_eq!(settings(&docs)["UNIDLER_OVNSB_DB"], southbound, "{overlay}");
        if let Some(on_host) = socket_on_host {
            let socket = southbound.strip_prefix("unix:").unwrap();
            assert_eq!(
                host_path_of(the_agent(&docs), socket).as_deref(),
                Some(on_host),
                "{overlay}: the Southbound socket is the host's"
            );
        }
        assert_eq!(
            host_path_of(the_agent(&docs), "/var/run/openvswitch/db.sock").as_deref(),
            Some("/var/run/openvswitch/db.sock"),
            "{overlay}: the Open_vSwitch database"
        );
        match overlay {
            "central" => {
                let settings = settings(&docs);
                // ovn-kubernetes' node certificate, where ovnkube keeps it on the host.
                for (file, on_host) in [
                    (
                        "UNIDLER_OVNSB_PRIVATE_KEY",
                        "/etc/ovn/ovncontroller-privkey.pem",
                    ),
                    (
                        "UNIDLER_OVNSB_CERTIFICATE",
                        "/etc/ovn/ovncontroller-cert.pem",
                    ),
                    ("UNIDLER_OVNSB_CA_CERT", "/etc/ovn/ca-cert.pem"),
                ] {
                    let path = settings[file].as_str().unwrap();
                    assert_eq!(
                        host_path_of(the_agent(&docs), path).as_deref(),
                        Some(on_host),
                        "central: {file}"
                    );
                }
                assert_eq!(settings["UNIDLER_OVNSB_ANY_MEMBER"], "true");
            }
            "openshift" => check_openshift("openshift", &docs),
            _ => {}
        }
    }
}

/// What OpenShift needs, which Kubernetes' schemas cannot check: an SCC with every field its
/// CRD requires, that admits the pods (host network and ports, spc_t), used only by the
/// unidler service account.
fn check_openshift(what: &str, docs: &[Value]) {
    let [scc] = of_kind(docs, "SecurityContextConstraints")[..] else {
        panic!("{what}: one SecurityContextConstraints")
    };
    // Required by openshift/api's CRD (security.openshift.io_securitycontextconstraints).
    for field in [
        "allowHostDirVolumePlugin",
        "allowHostIPC",
        "allowHostNetwork",
        "allowHostPID",
        "allowHostPorts",
        "allowPrivilegedContainer",
        "allowedCapabilities",
        "defaultAddCapabilities",
        "priority",
        "readOnlyRootFilesystem",
        "requiredDropCapabilities",
        "volumes",
    ] {
        assert!(
            scc.as_object().unwrap().contains_key(field),
            "{what}: the SCC lacks {field}"
        );
    }
    assert_eq!(
        scc["allowedCapabilities"],
        serde_json::json!(["BPF", "PERFMON", "NET_ADMIN"])
    );
    assert_eq!(scc["allowPrivilegedContainer"], false);
    assert_eq!(
        scc["allowHostPorts"], true,
        "{what}: a host-network pod's containerPort is a host port"
    );
    let [role] = of_kind(docs, "ClusterRole")[..] else {
        panic!("{what}: one ClusterRole")
    };
    assert_eq!(
        role["rules"][0]["resourceNames"],
        serde_json::json!([scc["metadata"]["name"]]),
        "{what}: the role grants the SCC by its name"
    );
    let [binding] = of_kind(docs, "RoleBinding")[..] else {
        panic!("{what}: one RoleBinding")
    };
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0],
        serde_json::json!({"kind": "ServiceAccount", "name": "unidler", "namespace": "unidler"}),
        "{what}: the SCC is for the unidler service account only"
    );
    for daemonset in of_kind(docs, "DaemonSet") {
        let spec = &daemonset["spec"]["template"]["spec"];
        assert_eq!(
            spec["securityContext"]["seLinuxOptions"]["type"], "spc_t",
            "{what}"
        );
        assert_eq!(spec["serviceAccountName"], "unidler", "{what}");
    }
}

#[test]
fn the_base_names_no_namespace_and_the_uninstall_cleans_every_node() {
    let base = documents(&render(&kubernetes_dir().join("base")));
    assert!(
        base.iter().all(|d| d["metadata"]["namespace"].is_null()),
        "the overlays choose the namespace"
    );
    let openshift = render(&kubernetes_dir().join("uninstall/openshift"));
    validate("uninstall-openshift", &openshift);
    check_openshift("uninstall/openshift", &documents(&openshift));
    let yaml = render(&kubernetes_dir().join("uninstall"));
    validate("uninstall", &yaml);
    let docs = documents(&yaml);
    let [daemonset] = of_kind(&docs, "DaemonSet")[..] else {
        panic!("one DaemonSet")
    };
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["tolerations"][0]["operator"], "Exists", "every node");
    assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
    let container = &spec["containers"][0];
    let script = container["args"][0].as_str().unwrap();
    assert!(
        script.contains("unidler detach --pin-dir /sys/fs/bpf/unidler"),
        "{script}"
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["add"],
        serde_json::json!(["BPF", "PERFMON", "NET_ADMIN"])
    );
    assert!(
        container["readinessProbe"]["exec"]["command"]
            .to_string()
            .contains("test ! -e /sys/fs/bpf/unidler"),
        "ready once the node is clean"
    );
}

#[test]
fn every_alert_and_dashboard_query_parses() {
    let used = monitoring::series_used();
    assert!(used.len() >= 30, "{used:?}");
    // A label value is read: a typo in one would be caught against the scrape.
    assert!(
        used.iter()
            .any(|(_, (name, labels))| name == "unidler_wakeups_total"
                && labels.contains(&("outcome".into(), "expired".into()))),
        "{used:?}"
    );
    // A broken expression is caught, not skipped.
    assert!(monitoring::selected("rate(unidler_x_total[5m]").is_err());
    let alerts = monitoring::alert_expressions();
    assert!(alerts.len() >= 6, "{alerts:?}");
}
