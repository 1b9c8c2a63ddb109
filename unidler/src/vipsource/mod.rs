//! Where VIPs come from: the OVN Southbound `Load_Balancer` table
//! ([`crate::ovn::vips`]), or a static file ([`file`]). (`--vip` flags need no source: the agent applies them once.)
//!
//! A source sends [`VipUpdate`](crate::vip::VipUpdate)s to the agent's loop, which applies
//! them to the [`VipRegistry`](crate::registry::VipRegistry) and the kernel map: a full
//! `Replace` after (re)connecting or reloading, incremental `Changes` otherwise.

pub mod file;
