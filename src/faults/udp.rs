//! A lossy UDP proxy for one client: Gilbert–Elliott bursts of loss, datagrams held back behind
//! the next one (reordering), duplicated datagrams, and blackholes (everything dropped, both
//! ways) for a while. Seeded, so a pattern of faults can be replayed.
//!
//! It forwards between the last client address it heard from and one server address, which is
//! what a QUIC client does: one socket for the life of its transport.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{net::UdpSocket, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// How one direction of the link misbehaves. Each datagram first moves the Gilbert–Elliott
/// chain (good ⇄ burst), then is lost with the state's loss probability, else maybe held back
/// behind the next datagram, else maybe sent twice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkProfile {
    /// Probability of entering a burst, per datagram, from the good state.
    pub enter_burst: f64,
    /// Probability of leaving a burst, per datagram.
    pub leave_burst: f64,
    /// Loss probability inside a burst.
    pub burst_loss: f64,
    /// Loss probability outside bursts.
    pub good_loss: f64,
    /// Probability of holding a datagram back behind the next one.
    pub reorder: f64,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
}

impl LinkProfile {
    /// A perfect link.
    pub const CLEAN: Self = Self {
        enter_burst: 0.0,
        leave_burst: 1.0,
        burst_loss: 0.0,
        good_loss: 0.0,
        reorder: 0.0,
        duplicate: 0.0,
    };

    /// About 10% loss overall, in bursts: the chain spends 0.04 / (0.04 + 0.3) ≈ 12% of
    /// datagrams in bursts losing 70%, and loses 2% outside them; 5% reordered, 1% duplicated.
    pub const BURSTY_10_PERCENT: Self = Self {
        enter_burst: 0.04,
        leave_burst: 0.3,
        burst_loss: 0.7,
        good_loss: 0.02,
        reorder: 0.05,
        duplicate: 0.01,
    };

    /// The long-run share of datagrams lost.
    pub fn expected_loss(&self) -> f64 {
        let in_burst = if self.enter_burst + self.leave_burst > 0.0 {
            self.enter_burst / (self.enter_burst + self.leave_burst)
        } else {
            0.0
        };
        in_burst * self.burst_loss + (1.0 - in_burst) * self.good_loss
    }
}

/// What one direction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams forwarded (duplicates and released held ones not counted again).
    pub passed: u64,
    /// Datagrams lost to the loss model.
    pub dropped: u64,
    /// Datagrams held back behind a later one.
    pub reordered: u64,
    /// Datagrams sent twice.
    pub duplicated: u64,
    /// Datagrams dropped by a blackhole.
    pub blackholed: u64,
}

impl DirectionStats {
    /// Every datagram that arrived at the proxy in this direction.
    pub fn seen(&self) -> u64 {
        self.passed + self.dropped + self.reordered + self.blackholed
    }
}

/// What both directions did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Client to server.
    pub up: DirectionStats,
    /// Server to client.
    pub down: DirectionStats,
}

impl std::fmt::Display for LinkStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, d) in [("up", &self.up), ("down", &self.down)] {
            write!(
                f,
                "{name}: {} passed {} dropped {} reordered {} duplicated {} blackholed; ",
                d.passed, d.dropped, d.reordered, d.duplicated, d.blackholed
            )?;
        }
        Ok(())
    }
}

/// The chain and the held datagram of one direction.
#[derive(Default)]
struct Direction {
    in_burst: bool,
    held: Option<Vec<u8>>,
}

impl Direction {
    /// The datagrams to send now for `datagram`.
    fn pass(
        &mut self,
        profile: &LinkProfile,
        rng: &mut StdRng,
        stats: &mut DirectionStats,
        datagram: &[u8],
    ) -> Vec<Vec<u8>> {
        self.in_burst = if self.in_burst {
            !chance(rng, profile.leave_burst)
        } else {
            chance(rng, profile.enter_burst)
        };
        let loss = if self.in_burst {
            profile.burst_loss
        } else {
            profile.good_loss
        };
        if chance(rng, loss) {
            stats.dropped += 1;
            return Vec::new();
        }
        if self.held.is_none() && chance(rng, profile.reorder) {
            stats.reordered += 1;
            self.held = Some(datagram.to_vec());
            return Vec::new();
        }
        stats.passed += 1;
        let mut out = vec![datagram.to_vec()];
        if chance(rng, profile.duplicate) {
            stats.duplicated += 1;
            out.push(datagram.to_vec());
        }
        out.extend(self.held.take());
        out
    }
}

fn chance(rng: &mut StdRng, p: f64) -> bool {
    p > 0.0 && rng.random_bool(p.min(1.0))
}

struct Shared {
    profile: LinkProfile,
    blackhole_until: Option<Instant>,
    stats: LinkStats,
}

/// The proxy; see the module docs. Stops when dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl UdpProxy {
    /// Starts a proxy on 127.0.0.1 to `server`, misbehaving per `profile`, its randomness
    /// drawn from `seed`.
    pub async fn start(
        server: SocketAddr,
        profile: LinkProfile,
        seed: u64,
    ) -> std::io::Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0").await?;
        let back = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = front.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared {
            profile,
            blackhole_until: None,
            stats: LinkStats::default(),
        }));
        let stop = CancellationToken::new();
        let task = tokio::spawn(forward(
            front,
            back,
            server,
            shared.clone(),
            StdRng::seed_from_u64(seed),
            stop.clone(),
        ));
        Ok(Self {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes how the link misbehaves from now on.
    pub fn set_profile(&self, profile: LinkProfile) {
        lock(&self.shared).profile = profile;
    }

    /// Drops every datagram, both ways, for `duration` from now.
    pub fn blackhole(&self, duration: Duration) {
        lock(&self.shared).blackhole_until = Some(Instant::now() + duration);
    }

    /// Ends a blackhole now, if one is on.
    pub fn end_blackhole(&self) {
        lock(&self.shared).blackhole_until = None;
    }

    /// What the link did so far.
    pub fn stats(&self) -> LinkStats {
        lock(&self.shared).stats
    }

    /// Stops forwarding and returns what the link did.
    pub async fn stop(mut self) -> LinkStats {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.stats()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn forward(
    front: UdpSocket,
    back: UdpSocket,
    server: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    mut rng: StdRng,
    stop: CancellationToken,
) {
    let (mut up, mut down) = (Direction::default(), Direction::default());
    let mut client = None;
    let (mut from_client, mut from_server) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    loop {
        // Receive errors (an ICMP error surfacing on the socket) are about one datagram only.
        tokio::select! {
            received = front.recv_from(&mut from_client) => {
                let Ok((len, from)) = received else { continue };
                client = Some(from);
                let out = decide(&shared, &mut rng, &mut up, true, &from_client[..len]);
                for datagram in out {
                    let _ = back.send_to(&datagram, server).await;
                }
            }
            received = back.recv_from(&mut from_server) => {
                let Ok((len, _)) = received else { continue };
                let Some(client) = client else { continue };
                let out = decide(&shared, &mut rng, &mut down, false, &from_server[..len]);
                for datagram in out {
                    let _ = front.send_to(&datagram, client).await;
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

fn decide(
    shared: &Mutex<Shared>,
    rng: &mut StdRng,
    direction: &mut Direction,
    upward: bool,
    datagram: &[u8],
) -> Vec<Vec<u8>> {
    let mut shared = lock(shared);
    let Shared {
        profile,
        blackhole_until,
        stats,
    } = &mut *shared;
    let stats = if upward {
        &mut stats.up
    } else {
        &mut stats.down
    };
    if blackhole_until.is_some_and(|until| Instant::now() < until) {
        stats.blackholed += 1;
        return Vec::new();
    }
    direction.pass(profile, rng, stats, datagram)
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // Only counters and plain values change under the lock; a poisoned one is still usable.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bursty_profile_loses_about_ten_percent() {
        let profile = LinkProfile::BURSTY_10_PERCENT;
        assert!((profile.expected_loss() - 0.1).abs() < 0.01);
        let mut rng = StdRng::seed_from_u64(7);
        let mut direction = Direction::default();
        let mut stats = DirectionStats::default();
        for i in 0..100_000u32 {
            direction.pass(&profile, &mut rng, &mut stats, &i.to_be_bytes());
        }
        let loss = stats.dropped as f64 / stats.seen() as f64;
        assert!((0.08..0.12).contains(&loss), "loss {loss}");
        assert!(stats.reordered > 0 && stats.duplicated > 0);
    }

    #[test]
    fn a_clean_link_passes_everything_in_order() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut direction = Direction::default();
        let mut stats = DirectionStats::default();
        let out: Vec<_> = (0..1000u32)
            .flat_map(|i| {
                direction.pass(&LinkProfile::CLEAN, &mut rng, &mut stats, &i.to_be_bytes())
            })
            .collect();
        let expected: Vec<_> = (0..1000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(out, expected);
    }
}
