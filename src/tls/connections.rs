//! [`LiveConnections`]: the client certificate chain of every live connection of both
//! transports, so that a reload can cut the connections whose certificate it now revokes.
//!
//! A transport [`track`](LiveConnections::track)s each connection after its handshake and
//! holds the returned [`Tracked`] for as long as the connection lives; it ends the connection
//! when [`Tracked::cut`] fires. Knows nothing of tonic or quinn.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

/// One live connection.
struct Live {
    chain: Arc<[CertificateDer<'static>]>,
    cut: CancellationToken,
}

/// The live connections of both transports; see the module docs.
#[derive(Default)]
pub struct LiveConnections {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
}

impl std::fmt::Debug for LiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConnections")
            .field("live", &self.len())
            .finish()
    }
}

impl LiveConnections {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a connection whose client presented `chain` (leaf first). It stays registered
    /// until the returned [`Tracked`] is dropped.
    pub fn track(self: &Arc<Self>, chain: &[CertificateDer<'_>]) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = CancellationToken::new();
        let chain: Arc<[CertificateDer<'static>]> =
            chain.iter().map(|c| c.clone().into_owned()).collect();
        self.lock().insert(
            id,
            Live {
                chain,
                cut: cut.clone(),
            },
        );
        Tracked {
            id,
            registry: self.clone(),
            cut,
        }
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cuts every connection whose chain `revoked` says is revoked; returns how many. The
    /// check runs outside the lock: it may verify signatures.
    pub(super) fn cut_where(&self, revoked: impl Fn(&[CertificateDer<'static>]) -> bool) -> usize {
        let live: Vec<_> = self
            .lock()
            .values()
            .filter(|l| !l.cut.is_cancelled())
            .map(|l| (l.chain.clone(), l.cut.clone()))
            .collect();
        let mut cut = 0;
        for (chain, token) in live {
            if revoked(&chain) {
                token.cancel();
                cut += 1;
            }
        }
        cut
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        // Only inserts and removes happen under the lock; a poisoned map is still consistent.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A tracked connection; unregisters on drop.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    registry: Arc<LiveConnections>,
    cut: CancellationToken,
}

impl Tracked {
    /// Cancelled when the connection's certificate has been revoked: end the connection.
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
