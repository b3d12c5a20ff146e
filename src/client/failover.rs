//! Failover across several cores: an edge host behind several cores that share one store gives
//! the consumer all of them, and each (re)connection goes to the first that answers.
//!
//! Owns only the choice of server; the resume position travels with the [`super::Consumer`],
//! and since cores sharing a store share one revision order, resuming on another core replays
//! exactly what was missed.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;

use super::{ClientError, Session, Transport};

/// A [`Transport`] over several servers. A connection tries the server that answered last
/// first, then the others in order, so a consumer stays on one core while it works and moves
/// on when it does not.
pub struct FailoverTransport {
    transports: Vec<Box<dyn Transport>>,
    /// Index of the server the last successful connection reached.
    preferred: AtomicUsize,
}

impl FailoverTransport {
    /// Fails over between `transports`, preferring them in the order given. At least one.
    pub fn new(transports: Vec<Box<dyn Transport>>) -> Result<Self, ClientError> {
        if transports.is_empty() {
            return Err(ClientError::Config(
                "failover needs at least one server".to_owned(),
            ));
        }
        Ok(Self {
            transports,
            preferred: AtomicUsize::new(0),
        })
    }

    /// Index (in the order given to [`FailoverTransport::new`]) of the server the last
    /// successful connection reached, or the first before any.
    pub fn current(&self) -> usize {
        self.preferred.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl Transport for FailoverTransport {
    fn name(&self) -> &'static str {
        self.transports[self.current()].name()
    }

    /// Tries every server once, starting with the preferred one. When all fail, the error is
    /// retryable if any of theirs was, and names each server's error.
    async fn connect(&self) -> Result<Box<dyn Session>, ClientError> {
        let count = self.transports.len();
        let first = self.current();
        let mut errors = Vec::with_capacity(count);
        for index in (first..count).chain(0..first) {
            match self.transports[index].connect().await {
                Ok(session) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(session);
                }
                Err(error) => {
                    tracing::debug!(server = index, %error, "server did not answer; trying the next");
                    errors.push((index, error));
                }
            }
        }
        if let [(_, only)] = errors.as_slice() {
            return Err(only.clone());
        }
        let all = errors
            .iter()
            .map(|(index, error)| format!("server {index}: {error}"))
            .collect::<Vec<_>>()
            .join("; ");
        if errors.iter().any(|(_, e)| e.is_retryable()) {
            Err(ClientError::Transport(all))
        } else {
            Err(ClientError::Config(all))
        }
    }

    async fn close(&self) {
        futures_util::future::join_all(self.transports.iter().map(|t| t.close())).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::{
        client::UpdateStream,
        pb::{
            AckRequest, FetchWorkerRequest, ListWorkersRequest, ListWorkersResponse,
            RegisterRequest, RegisterResponse, SubscribeRequest,
        },
    };

    /// A server that is up or down, counting connection attempts.
    #[derive(Clone)]
    struct Fake {
        name: &'static str,
        up: Arc<AtomicBool>,
        attempts: Arc<AtomicUsize>,
        error: ClientError,
    }

    impl Fake {
        fn new(name: &'static str, up: bool) -> Self {
            Self {
                name,
                up: Arc::new(AtomicBool::new(up)),
                attempts: Arc::new(AtomicUsize::new(0)),
                error: ClientError::Transport(format!("{name} refused")),
            }
        }

        fn attempts(&self) -> usize {
            self.attempts.load(Ordering::Relaxed)
        }
    }

    #[async_trait]
    impl Transport for Fake {
        fn name(&self) -> &'static str {
            self.name
        }

        async fn connect(&self) -> Result<Box<dyn Session>, ClientError> {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            if self.up.load(Ordering::Relaxed) {
                Ok(Box::new(NoSession))
            } else {
                Err(self.error.clone())
            }
        }
    }

    struct NoSession;

    #[async_trait]
    impl Session for NoSession {
        async fn subscribe(&self, _: SubscribeRequest) -> Result<UpdateStream, ClientError> {
            Err(ClientError::Transport("fake".to_owned()))
        }
        async fn fetch(&self, _: FetchWorkerRequest) -> Result<(String, Bytes), ClientError> {
            Err(ClientError::Transport("fake".to_owned()))
        }
        async fn ack(&self, _: AckRequest) -> Result<(), ClientError> {
            Ok(())
        }
        async fn register(&self, _: RegisterRequest) -> Result<RegisterResponse, ClientError> {
            Ok(RegisterResponse::default())
        }
        async fn list(&self, _: ListWorkersRequest) -> Result<ListWorkersResponse, ClientError> {
            Ok(ListWorkersResponse::default())
        }
    }

    fn failover(servers: &[&Fake]) -> FailoverTransport {
        FailoverTransport::new(
            servers
                .iter()
                .map(|f| Box::new((*f).clone()) as Box<dyn Transport>)
                .collect(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn stays_on_a_working_server_and_moves_on_only_when_it_fails() {
        let (a, b, c) = (
            Fake::new("a", true),
            Fake::new("b", true),
            Fake::new("c", true),
        );
        let transport = failover(&[&a, &b, &c]);
        transport.connect().await.unwrap();
        transport.connect().await.unwrap();
        assert_eq!((transport.current(), a.attempts(), b.attempts()), (0, 2, 0));

        a.up.store(false, Ordering::Relaxed);
        transport.connect().await.unwrap();
        assert_eq!((transport.current(), transport.name()), (1, "b"));

        // Back up, `a` is not preferred again while `b` works.
        a.up.store(true, Ordering::Relaxed);
        transport.connect().await.unwrap();
        assert_eq!((transport.current(), a.attempts(), b.attempts()), (1, 3, 2));

        // From `c`, the search wraps around to `a`.
        b.up.store(false, Ordering::Relaxed);
        c.up.store(false, Ordering::Relaxed);
        transport.connect().await.unwrap();
        assert_eq!((transport.current(), c.attempts()), (0, 1));
    }

    #[tokio::test]
    async fn all_servers_down_is_a_retryable_error_naming_each() {
        let (a, b) = (Fake::new("a", false), Fake::new("b", false));
        let transport = failover(&[&a, &b]);
        let error = transport.connect().await.err().unwrap();
        assert!(error.is_retryable(), "{error}");
        let text = error.to_string();
        assert!(
            text.contains("server 0: transport: a refused")
                && text.contains("server 1: transport: b refused"),
            "{text}"
        );
        assert_eq!((a.attempts(), b.attempts(), transport.current()), (1, 1, 0));
    }

    #[tokio::test]
    async fn refusals_that_retrying_cannot_fix_are_not_retried_forever() {
        let mut a = Fake::new("a", false);
        a.error = ClientError::Config("bad certificate".to_owned());
        let mut b = Fake::new("b", false);
        b.error = ClientError::Config("bad certificate".to_owned());
        let error = failover(&[&a, &b]).connect().await.err().unwrap();
        assert!(!error.is_retryable(), "{error}");

        let only = failover(&[&a]).connect().await.err().unwrap();
        assert!(matches!(only, ClientError::Config(ref m) if m == "bad certificate"));
    }

    #[test]
    fn no_servers_is_a_configuration_error() {
        assert!(matches!(
            FailoverTransport::new(Vec::new()),
            Err(ClientError::Config(_))
        ));
    }
}
