//! unidler's agent as a library: the datapath (loading, attaching, maps), the VIP model and
//! registry, and the event records the agent emits. The `unidler` binary is a thin CLI over it;
//! the integration tests and benchmarks use it directly.

pub mod caps;
pub mod datapath;
pub mod event;
pub mod registry;
pub mod sink;
pub mod telemetry;
pub mod vip;
pub mod vipsource;
