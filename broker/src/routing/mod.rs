//! Routing end users (SPEC section 8, issue 5): the broker's route service
//! on the [`ferry_common::ALPN_ROUTE`] protocol ([`server`]) and the client
//! library `ferry-connect` is built on ([`client`]).
//!
//! The route service checks who asks (credentials, assignment, the group's
//! status) and hands the request to the group's actor, the only place that
//! admits sessions ([`crate::groups::actor`]'s routing part); it signs the
//! ticket for the slot the actor reserved. Failed logins are throttled
//! per user and per source address before any password is hashed
//! ([`throttle`]).

pub mod client;
pub mod server;
pub mod throttle;

pub use client::{ClientError, RouteAnswer, RouteClient};
pub use server::{RouteService, ACCEPTING_STATUSES};
