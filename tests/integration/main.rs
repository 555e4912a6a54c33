//! Integration tests over real sockets, one binary (a module per area).

mod admin_surface;
mod alerts;
mod browser;
mod cli;
mod client_auth;
mod defaults;
mod docs;
mod doctor;
mod egress;
mod engine;
mod explain;
mod fault_proxy;
mod fleet;
mod framing;
mod grant_safety;
mod harness;
mod hostile;
mod idp_faults;
mod login;
mod ops;
mod providers;
mod proxy;
mod reactive;
mod reload;
mod store_keys;
mod tokens;
