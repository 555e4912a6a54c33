//! Integration tests over real sockets, one binary (a module per area).

mod engine;
mod harness;
mod proxy;
mod support;
