//! unidler's agent as a library: the [`agent`] itself (its configuration and loop), the
//! datapath (loading, attaching, maps), the VIP model, registry and sources, the Southbound
//! connection and the Controller_Event writer, and telemetry. The `unidler` binary is a thin CLI
//! over it; the integration tests and benchmarks use it directly.

pub mod agent;
pub mod caps;
pub mod clock;
pub mod datapath;
pub mod event;
pub mod fast_hash;
pub mod hold;
pub mod links;
pub mod map_batch;
pub mod ovn;
pub mod pace;
pub mod pinning;
pub mod registry;
pub mod telemetry;
pub mod vip;
pub mod vipsource;
pub mod wakeup;
