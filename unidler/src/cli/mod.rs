//! The command line's parts: `run` ([`run`]), the inspection commands and `detach`
//! ([`inspect`]), and how values are written ([`values`]).

pub mod inspect;
pub mod run;
pub mod values;
