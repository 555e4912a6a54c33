//! Integration tests over real sockets, one binary (a module per area).

mod browser;
mod cli;
mod engine;
mod harness;
mod ops;
mod proxy;
mod reactive;
mod reload;
mod support;
mod tokens;
