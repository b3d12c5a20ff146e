//! A TCP proxy that cuts connections mid-stream: each connection lives for a random,
//! exponentially distributed time while cuts are on, or until [`TcpProxy::cut_all`]; a cut
//! resets both halves (`SO_LINGER` 0, so the peers see a RST, not an orderly close).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What the proxy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections reset by the proxy (at random or by `cut_all`; not those reset by stopping).
    pub cut: u64,
    /// Connections refused because the server did not answer.
    pub upstream_refused: u64,
}

impl std::fmt::Display for TcpStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections, {} cut, {} refused upstream",
            self.accepted, self.cut, self.upstream_refused
        )
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    cut: AtomicU64,
    upstream_refused: AtomicU64,
}

struct Shared {
    /// The mean lifetime of connections (`None`: no random cuts); connections redraw their
    /// lifetime when it changes.
    mean_lifetime: watch::Sender<Option<Duration>>,
    rng: Mutex<StdRng>,
    /// Bumped by `cut_all`: every connection open at that moment is reset.
    generation: watch::Sender<u64>,
    /// Where new connections go (a failover moves it).
    upstream: Mutex<SocketAddr>,
    counters: Counters,
}

impl Shared {
    /// A lifetime drawn from the exponential distribution with the current mean.
    fn lifetime(&self) -> Option<Duration> {
        let mean = *self.mean_lifetime.borrow();
        let uniform: f64 = self
            .rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .random_range(f64::EPSILON..1.0);
        mean.map(|mean| mean.mul_f64(-uniform.ln()))
    }
}

/// The proxy; see the module docs. Stops (resetting what it holds) when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy on 127.0.0.1 to `server`. `mean_lifetime`: cut each connection after an
    /// exponentially distributed time with this mean (`None`: never at random).
    pub async fn start(
        server: SocketAddr,
        mean_lifetime: Option<Duration>,
        seed: u64,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mean_lifetime: watch::Sender::new(mean_lifetime),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            generation: watch::Sender::new(0),
            upstream: Mutex::new(server),
            counters: Counters::default(),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept(listener, shared.clone(), stop.clone()));
        Ok(Self {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Turns random cuts on (with this mean lifetime) or off; every open connection draws a
    /// new lifetime from now.
    pub fn set_mean_lifetime(&self, mean_lifetime: Option<Duration>) {
        self.shared.mean_lifetime.send_replace(mean_lifetime);
    }

    /// Sends new connections to `server` from now on (open ones stay: [`Self::cut_all`]).
    pub fn set_upstream(&self, server: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = server;
    }

    /// Resets every connection open now.
    pub fn cut_all(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> TcpStats {
        let c = &self.shared.counters;
        TcpStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            cut: c.cut.load(Ordering::Relaxed),
            upstream_refused: c.upstream_refused.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, resets every connection, and returns what the proxy did.
    pub async fn stop(mut self) -> TcpStats {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.stats()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        // An accept error concerns one connection (e.g. it was reset while queued).
        let Ok((client, _)) = accepted else { continue };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let server = *shared.upstream.lock().unwrap_or_else(|p| p.into_inner());
        connections.spawn(relay(client, server, shared.clone(), stop.clone()));
    }
    connections.close();
    connections.wait().await;
}

async fn relay(
    mut client: TcpStream,
    server: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut generation = shared.generation.subscribe();
    generation.borrow_and_update();
    let Ok(mut upstream) = TcpStream::connect(server).await else {
        shared
            .counters
            .upstream_refused
            .fetch_add(1, Ordering::Relaxed);
        let _ = client.set_zero_linger();
        return;
    };
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    let mut mean = shared.mean_lifetime.subscribe();
    mean.borrow_and_update();
    let (cut, counted) = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        loop {
            let lifetime = shared.lifetime();
            let timer = async {
                match lifetime {
                    Some(lifetime) => tokio::time::sleep(lifetime).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut copy => break (false, false),
                () = timer => break (true, true),
                // A new mean: draw a new lifetime.
                _ = mean.changed() => {}
                _ = generation.changed() => break (true, true),
                // Stopping the proxy resets what it holds, but that is not a fault injected.
                () = stop.cancelled() => break (true, false),
            }
        }
    };
    if counted {
        shared.counters.cut.fetch_add(1, Ordering::Relaxed);
    }
    if cut {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn cut_all_resets_open_connections_and_new_ones_still_pass() {
        let proxy = TcpProxy::start(echo_server().await, None, 1).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        proxy.cut_all();
        let mut rest = Vec::new();
        let ended = stream.read_to_end(&mut rest).await;
        assert!(
            matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{ended:?}"
        );

        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        again.write_all(b"pong").await.unwrap();
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        let stats = proxy.stop().await;
        assert_eq!((stats.accepted, stats.cut), (2, 1));
    }
}
