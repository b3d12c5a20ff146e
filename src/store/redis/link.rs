//! Where the Redis store's connections go: one Redis (`redis://`, `rediss://`), or the master
//! that a set of Sentinels names (`redis+sentinel://host:port[,host:port…]/<service>[/<db>]`,
//! with an optional `password@` for the master), re-asked after a connection fails or the
//! server turned read-only, so that a failover is followed without a restart.

use std::sync::Mutex;

use redis::{
    Client, ConnectionAddr, RedisError, RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
};

/// The scheme of a Sentinel URL.
pub(super) const SENTINEL_SCHEME: &str = "redis+sentinel://";

enum Target {
    Direct(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// The current connection (and the client it was made from), numbered so that a failure
/// reported on an old one does not replace a new one.
struct Current {
    generation: u64,
    client: Client,
    manager: ConnectionManager,
}

/// The store's way to Redis; see the module docs.
pub(crate) struct Link {
    target: Target,
    config: ConnectionManagerConfig,
    current: Mutex<Option<Current>>,
}

impl Link {
    /// A link for `url`. Connects lazily: nothing is reached here.
    pub(crate) fn open(url: &str, config: ConnectionManagerConfig) -> Result<Self, String> {
        let target = match url.strip_prefix(SENTINEL_SCHEME) {
            Some(rest) => Target::Sentinel(tokio::sync::Mutex::new(sentinel(rest)?)),
            None => Target::Direct(Client::open(url).map_err(|e| format!("redis url: {e}"))?),
        };
        let link = Self {
            target,
            config,
            current: Mutex::new(None),
        };
        if let Target::Direct(client) = &link.target {
            let manager =
                ConnectionManager::new_lazy_with_config(client.clone(), link.config.clone())
                    .map_err(|e| format!("redis connection: {e}"))?;
            *link.lock() = Some(Current {
                generation: 0,
                client: client.clone(),
                manager,
            });
        }
        Ok(link)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        // Every critical section is one read or one assignment.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection to use now, and its generation (for [`Self::failed`]).
    pub(crate) async fn manager(&self) -> RedisResult<(u64, ConnectionManager)> {
        if let Some(current) = self.lock().as_ref() {
            return Ok((current.generation, current.manager.clone()));
        }
        self.resolve(None).await?;
        self.lock()
            .as_ref()
            .map(|c| (c.generation, c.manager.clone()))
            .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "no redis master known")))
    }

    /// A client of the current master (for pub/sub), asking the Sentinels anew.
    pub(crate) async fn client(&self) -> RedisResult<Client> {
        if let Target::Direct(client) = &self.target {
            return Ok(client.clone());
        }
        self.resolve(None).await?;
        self.lock()
            .as_ref()
            .map(|c| c.client.clone())
            .ok_or_else(|| RedisError::from((redis::ErrorKind::Io, "no redis master known")))
    }

    /// With Sentinels: asks them for the master again (the pub/sub connection broke).
    pub(crate) async fn renew(&self) {
        let generation = self.lock().as_ref().map(|c| c.generation);
        if let Some(generation) = generation
            && let Err(error) = self.resolve(Some(generation)).await
        {
            tracing::debug!(%error, "redis sentinels did not name a master");
        }
    }

    /// Reports that `error` happened on the connection of `generation`: with Sentinels, a
    /// broken, refused or read-only connection makes the next use ask them for the master.
    pub(crate) async fn failed(&self, generation: u64, error: &RedisError) {
        let moved = error.is_io_error()
            || error.is_connection_refusal()
            || error.is_connection_dropped()
            || error.code() == Some("READONLY");
        if moved
            && matches!(self.target, Target::Sentinel(_))
            && let Err(error) = self.resolve(Some(generation)).await
        {
            tracing::warn!(%error, "redis sentinels did not name a master; retrying on next use");
        }
    }

    /// Asks the Sentinels for the master and connects to it, unless the connection changed
    /// since `stale` (someone else resolved already). No-op for a direct link.
    async fn resolve(&self, stale: Option<u64>) -> RedisResult<()> {
        let Target::Sentinel(sentinel) = &self.target else {
            return Ok(());
        };
        let mut sentinel = sentinel.lock().await;
        let generation = match (self.lock().as_ref(), stale) {
            (Some(current), Some(stale)) if current.generation != stale => return Ok(()),
            (Some(_), None) => return Ok(()),
            (Some(current), Some(_)) => current.generation + 1,
            (None, _) => 0,
        };
        let client = sentinel.async_get_client().await?;
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), self.config.clone())?;
        tracing::info!(master = %client.get_connection_info().addr(), generation, "redis master named by the sentinels");
        *self.lock() = Some(Current {
            generation,
            client,
            manager,
        });
        Ok(())
    }
}

/// Parses `password@host:port,host:port/service[/db]` (the part after the scheme).
fn sentinel(rest: &str) -> Result<SentinelClient, String> {
    let bad = |what: &str| {
        format!(
            "redis sentinel url: {what} (expected {SENTINEL_SCHEME}[password@]host:port[,host:port…]/service[/db])"
        )
    };
    let (password, rest) = match rest.rsplit_once('@') {
        Some((password, rest)) => (Some(password), rest),
        None => (None, rest),
    };
    let (hosts, path) = rest.split_once('/').ok_or_else(|| bad("no service name"))?;
    let mut path = path.split('/');
    let service = path
        .next()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("no service name"))?;
    let db = match path.next() {
        None | Some("") => None,
        Some(db) => Some(
            db.parse::<i64>()
                .map_err(|_| bad("the db is not a number"))?,
        ),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = host
            .rsplit_once(':')
            .ok_or_else(|| bad("a sentinel without a port"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| bad("a sentinel port is not a number"))?;
        nodes.push(ConnectionAddr::Tcp(name.to_owned(), port));
    }
    let mut builder = SentinelClientBuilder::new(nodes, service, SentinelServerType::Master)
        .map_err(|e| bad(&e.to_string()))?;
    if let Some(password) = password {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(db) = db {
        builder = builder.set_client_to_redis_db(db);
    }
    builder.build().map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_their_sentinels_and_service() {
        for good in [
            "a:26379/mymaster",
            "a:26379,b:26380/mymaster/2",
            "secret@a:26379/mymaster",
        ] {
            assert!(sentinel(good).is_ok(), "{good}");
        }
        for bad in ["a:26379", "a/mymaster", "a:x/mymaster", "a:1/", "a:1/m/x"] {
            let error = sentinel(bad).err().unwrap();
            assert!(error.contains("redis sentinel url"), "{bad}: {error}");
        }
    }
}
