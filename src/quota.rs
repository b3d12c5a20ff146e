//! Per-identity quotas: how many connections and streams one certificate identity may hold at
//! once on a transport, so that one consumer (or one stolen key) cannot take every slot.
//!
//! Transport-neutral and I/O-free: gRPC and QUIC each keep one [`IdentityQuota`] and hold a
//! [`QuotaPermit`] for as long as a connection or stream lives. Depends on nothing else in the
//! crate.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

/// The limits, per identity and per transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityLimits {
    /// Connections one identity may hold at once (`MAX_CONNECTIONS_PER_IDENTITY`).
    pub max_connections: usize,
    /// Streams (subscriptions and fetches) one identity may hold at once, over all its
    /// connections (`MAX_STREAMS_PER_IDENTITY`).
    pub max_streams: usize,
}

impl Default for IdentityLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_streams: 512,
        }
    }
}

/// What an identity ran out of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    /// Too many connections.
    #[error("too many connections for this client identity (limit {limit})")]
    Connections {
        /// The limit.
        limit: usize,
    },
    /// Too many streams.
    #[error("too many concurrent streams for this client identity (limit {limit})")]
    Streams {
        /// The limit.
        limit: usize,
    },
}

#[derive(Clone, Copy, Default, Debug)]
struct Held {
    connections: usize,
    streams: usize,
}

/// Counts what each identity holds. The table only has entries for identities holding
/// something, so its size is bounded by the connections alive.
#[derive(Debug)]
pub struct IdentityQuota {
    limits: IdentityLimits,
    held: Mutex<HashMap<Arc<str>, Held>>,
}

/// One connection or stream counted against an identity; released on drop.
#[derive(Debug)]
pub struct QuotaPermit {
    quota: Arc<IdentityQuota>,
    identity: Arc<str>,
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Connection,
    Stream,
}

impl IdentityQuota {
    /// A quota with these limits.
    pub fn new(limits: IdentityLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The limits.
    pub fn limits(&self) -> IdentityLimits {
        self.limits
    }

    /// Counts one more connection of `identity`, unless it holds the most already.
    pub fn connection(self: &Arc<Self>, identity: &Arc<str>) -> Result<QuotaPermit, QuotaExceeded> {
        self.acquire(identity, Kind::Connection)
    }

    /// Counts one more stream of `identity`, unless it holds the most already.
    pub fn stream(self: &Arc<Self>, identity: &Arc<str>) -> Result<QuotaPermit, QuotaExceeded> {
        self.acquire(identity, Kind::Stream)
    }

    /// How many identities hold something (for tests and metrics).
    pub fn identities(&self) -> usize {
        self.table().len()
    }

    fn acquire(
        self: &Arc<Self>,
        identity: &Arc<str>,
        kind: Kind,
    ) -> Result<QuotaPermit, QuotaExceeded> {
        let mut table = self.table();
        let held = table.entry(identity.clone()).or_default();
        let (count, limit, exceeded) = match kind {
            Kind::Connection => (
                &mut held.connections,
                self.limits.max_connections,
                QuotaExceeded::Connections {
                    limit: self.limits.max_connections,
                },
            ),
            Kind::Stream => (
                &mut held.streams,
                self.limits.max_streams,
                QuotaExceeded::Streams {
                    limit: self.limits.max_streams,
                },
            ),
        };
        if *count >= limit {
            if held.connections == 0 && held.streams == 0 {
                table.remove(identity);
            }
            return Err(exceeded);
        }
        *count += 1;
        Ok(QuotaPermit {
            quota: self.clone(),
            identity: identity.clone(),
            kind,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Held>> {
        // Every critical section leaves the counts consistent, so a poisoned lock is usable.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut table = self.quota.table();
        if let Some(held) = table.get_mut(&self.identity) {
            match self.kind {
                Kind::Connection => held.connections = held.connections.saturating_sub(1),
                Kind::Stream => held.streams = held.streams.saturating_sub(1),
            }
            if held.connections == 0 && held.streams == 0 {
                table.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_per_identity_and_free_on_drop() {
        let quota = IdentityQuota::new(IdentityLimits {
            max_connections: 2,
            max_streams: 1,
        });
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = quota.connection(&a).unwrap();
        let _second = quota.connection(&a).unwrap();
        assert_eq!(
            quota.connection(&a).unwrap_err(),
            QuotaExceeded::Connections { limit: 2 }
        );
        let _other = quota.connection(&b).unwrap();
        let stream = quota.stream(&a).unwrap();
        assert_eq!(
            quota.stream(&a).unwrap_err(),
            QuotaExceeded::Streams { limit: 1 }
        );
        drop(first);
        let _again = quota.connection(&a).unwrap();
        drop(stream);
        let _stream = quota.stream(&a).unwrap();
    }

    #[test]
    fn the_table_forgets_identities_that_hold_nothing() {
        let quota = IdentityQuota::new(IdentityLimits {
            max_connections: 1,
            max_streams: 0,
        });
        for i in 0..100 {
            let identity: Arc<str> = format!("consumer-{i}").into();
            let permit = quota.connection(&identity).unwrap();
            assert!(quota.stream(&identity).is_err());
            drop(permit);
        }
        let never: Arc<str> = "never".into();
        assert!(quota.stream(&never).is_err());
        assert_eq!(quota.identities(), 0);
    }
}
