//! Shared state for tower-ai through Redis: limits, cooldowns and breaker state that hold
//! across every replica of a service, instead of multiplying by their number.
//!
//! A team running four replicas of a gateway on one provider account gets, with in-process
//! state, four times its requests-per-minute, four separate cooldowns (each replica must meet
//! the `429` itself) and four breakers. With a [`RedisStore`] given to TokenBudget,
//! RetryAfterAware and CircuitBreaker, the replicas share one set of limits, decided
//! atomically by Lua scripts on Redis's own clock (replicas' clocks may disagree).
//!
//! The in-process state stays the default: nothing changes for a service that does not opt
//! in. When Redis is down or slow, each layer decides in-process at its limit divided by the
//! number of replicas ([`RedisStore::replicas`]), logs one warning per outage, and returns to
//! shared state by itself when Redis is back.
//!
//! ```no_run
//! use tower_ai_redis::RedisStore;
//!
//! # fn main() -> Result<(), tower_ai_redis::StoreError> {
//! let store = RedisStore::open("redis://127.0.0.1:6379/")?;
//! assert!(!store.is_degraded());
//! # Ok(()) }
//! ```
//!
//! Every key of one decision carries the same Redis Cluster hash tag (each layer's
//! `hash_tag` / `tag`, e.g. the provider account), so each script touches one slot. A
//! store connects to one server (a primary, or a proxy in front of a cluster) or, with the
//! feature `cluster`, to a Redis Cluster (`RedisStore::cluster`,
//! `RedisStoreBuilder::build_cluster`): each script goes to the node of its tag's slot,
//! so layers (or tenants) given different tags spread over the cluster's nodes. A budget
//! may instead give each key its own tag (`RedisBudgetBuilder::hash_tag_per_key`): its
//! keys then spread over the nodes by themselves.
//!
//! The scripts are plain Lua 5.1 with no module and no command newer than Redis 7, so they
//! run on Redis 7 and later and on Valkey.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod periodic;
mod store;
pub mod testing;

pub use store::{RedisStore, RedisStoreBuilder, StoreError, ToRedisArgsDyn};

// Cooldowns and breaker state (RetryAfterAware, CircuitBreaker).
mod breaker;
mod cooldown;
pub use breaker::RedisBreakers;
pub use cooldown::RedisCooldowns;

// TokenBudget's shared state.
mod budget;
pub use budget::{Mode as BudgetMode, RedisBudget, RedisBudgetBuilder};
