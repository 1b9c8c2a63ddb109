//! Which Linux capabilities the agent needs, and which of them this process lacks.

/// A capability the agent needs, with its number and why.
struct Needed {
    name: &'static str,
    bit: u32,
    why: &'static str,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

const NEEDED: &[Needed] = &[
    Needed {
        name: "CAP_BPF",
        bit: CAP_BPF,
        why: "to create the maps and load the XDP program",
    },
    Needed {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        why: "for the verifier to accept the program's packet-pointer arithmetic",
    },
    Needed {
        name: "CAP_NET_ADMIN",
        bit: CAP_NET_ADMIN,
        why: "to attach XDP programs to network interfaces",
    },
];

/// The effective capability set of this process, from `/proc/self/status`.
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Names of needed capabilities this process lacks (CAP_SYS_ADMIN stands in for CAP_BPF and
/// CAP_PERFMON, as on kernels before 5.8).
pub fn missing() -> Vec<&'static str> {
    let Some(eff) = effective() else {
        return Vec::new();
    };
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    NEEDED
        .iter()
        .filter(|n| {
            let covered_by_sys_admin = n.bit != CAP_NET_ADMIN && has(CAP_SYS_ADMIN);
            !has(n.bit) && !covered_by_sys_admin
        })
        .map(|n| n.name)
        .collect()
}

/// A sentence for the operator naming the missing capabilities and why each is needed,
/// or `None` if none is missing.
pub fn explain_missing() -> Option<String> {
    let missing = missing();
    if missing.is_empty() {
        return None;
    }
    let reasons: Vec<String> = NEEDED
        .iter()
        .filter(|n| missing.contains(&n.name))
        .map(|n| format!("{} ({})", n.name, n.why))
        .collect();
    Some(format!(
        "insufficient privileges: missing {}. Run as root, or grant them (e.g. the DaemonSet's securityContext.capabilities.add, or `setcap cap_bpf,cap_perfmon,cap_net_admin+ep`)",
        reasons.join(", ")
    ))
}
