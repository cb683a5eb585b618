//! The OX appliance: what `oxd` and `oxctl` share — the control API's wire protocol
//! ([`api`]) and the hash-chained audit log ([`audit`]).

pub mod api;
pub mod audit;
