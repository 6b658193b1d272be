//! fleetcare: a gRPC control plane that keeps fleets of AI agents healthy.
//!
//! Layers, from the bottom: `domain` (pure logic), `storage` (the store
//! traits, SQLite and Postgres), `runtime` (background tasks), `grpc` (thin
//! service adapters), wired together by `startup`; which may import which is
//! in docs/architecture.md (Layers) and checked by `tests/layers.rs`. `tls`
//! terminates TLS with certificates reloaded while serving. The Rust client
//! (the generated types and stubs, a resuming watch, a heartbeater) is the
//! crate `fleetcare-client` in `clients/rust`; `cli` is the operator CLI
//! built on it.

pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod processors;
pub mod proto;
pub mod runtime;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod views;
