//! Everything that knows OVN: the Southbound connection and our Chassis ([`southbound`]),
//! the VIPs of its `Load_Balancer` table ([`vips`]), the `Controller_Event` rows we write
//! ([`controller_event`]), the load balancers' names those rows give ([`lb_names`]), the
//! node's Open_vSwitch database (its VIFs and uplinks, [`ovs_interfaces`]) and its
//! forwarding (whether br-int's flows carry a new backend, [`forwarding`]).
//!
//! The rest of the agent knows VIPs, interfaces and rows to write; only this folder knows
//! OVN's tables.

pub mod controller_event;
pub mod forwarding;
pub mod lb_names;
pub mod ovs_interfaces;
pub mod southbound;
pub mod vips;
