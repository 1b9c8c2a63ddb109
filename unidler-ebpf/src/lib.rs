//! Empty on purpose: `unidler/build.rs` depends on this library so that cargo rebuilds the
//! agent whenever the XDP program (the `unidler` binary target of this crate) changes.
#![no_std]
