//! Asking the cluster which nodes to use: gRPC `herald.v1.Herald/Dispatch` on any seed.

use std::time::Duration;

use herald_proto::v1::herald_client::HeraldClient;
use herald_proto::v1::DispatchRequest;
use tonic::transport::Endpoint;

use crate::backoff::BackoffConfig;
use crate::ClientError;

/// What Dispatch answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DispatchInfo {
    /// Client addresses, best first.
    pub(crate) nodes: Vec<String>,
    /// Backoff parameters, when the cluster gave both.
    pub(crate) backoff: Option<(Duration, Duration)>,
}

impl DispatchInfo {
    /// `cfg` with the cluster's backoff parameters applied.
    pub(crate) fn apply_backoff(&self, mut cfg: BackoffConfig) -> BackoffConfig {
        if let Some((initial, max)) = self.backoff {
            cfg.initial = initial;
            cfg.max = max.max(initial);
        }
        cfg
    }
}

/// A gRPC URI for a seed given as `host:port` or as a full `http://` URI.
pub(crate) fn seed_uri(seed: &str) -> String {
    if seed.contains("://") {
        seed.to_string()
    } else {
        format!("http://{seed}")
    }
}

/// Asks the seeds in turn, starting at `start`, until one answers with at least one node.
pub(crate) async fn dispatch(
    seeds: &[String],
    start: usize,
    app: &str,
    user: &str,
    transport: &str,
    timeout: Duration,
) -> Result<DispatchInfo, ClientError> {
    let mut last = ClientError::Dispatch("no dispatch seeds".into());
    for i in 0..seeds.len() {
        let seed = &seeds[(start + i) % seeds.len()];
        match ask(seed, app, user, transport, timeout).await {
            Ok(info) if !info.nodes.is_empty() => return Ok(info),
            Ok(_) => {
                tracing::debug!(%seed, "dispatch answered no nodes");
                last = ClientError::Dispatch(format!("{seed}: no healthy nodes"));
            }
            Err(e) => {
                tracing::debug!(%seed, error = %e, "dispatch seed failed");
                last = e;
            }
        }
    }
    Err(last)
}

async fn ask(
    seed: &str,
    app: &str,
    user: &str,
    transport: &str,
    timeout: Duration,
) -> Result<DispatchInfo, ClientError> {
    let endpoint = Endpoint::from_shared(seed_uri(seed))
        .map_err(|e| ClientError::Config(format!("dispatch seed {seed:?}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let fut = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Dispatch(format!("{seed}: {e}")))?;
        let reply = HeraldClient::new(channel)
            .dispatch(DispatchRequest {
                app: app.into(),
                user: user.into(),
                transport: transport.into(),
            })
            .await
            .map_err(|s| ClientError::Dispatch(format!("{seed}: {}: {}", s.code(), s.message())))?
            .into_inner();
        let backoff = (reply.backoff_initial_ms > 0 && reply.backoff_max_ms > 0).then(|| {
            (
                Duration::from_millis(reply.backoff_initial_ms.into()),
                Duration::from_millis(reply.backoff_max_ms.into()),
            )
        });
        Ok(DispatchInfo {
            nodes: reply
                .nodes
                .into_iter()
                .map(|n| n.addr)
                .filter(|a| !a.is_empty())
                .collect(),
            backoff,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Dispatch(format!("{seed}: timed out")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_become_http_uris() {
        assert_eq!(seed_uri("127.0.0.1:7401"), "http://127.0.0.1:7401");
        assert_eq!(seed_uri("http://n1:7401"), "http://n1:7401");
    }

    #[test]
    fn cluster_backoff_overrides_the_local_one() {
        let info = DispatchInfo {
            nodes: vec![],
            backoff: Some((Duration::from_millis(200), Duration::from_millis(100))),
        };
        let cfg = info.apply_backoff(BackoffConfig::default());
        assert_eq!(cfg.initial, Duration::from_millis(200));
        assert_eq!(cfg.max, Duration::from_millis(200), "max never below initial");
        assert_eq!(cfg.reset_after, BackoffConfig::default().reset_after);
        let none = DispatchInfo {
            nodes: vec![],
            backoff: None,
        };
        assert_eq!(
            none.apply_backoff(BackoffConfig::default()),
            BackoffConfig::default()
        );
    }

    #[tokio::test]
    async fn unreachable_seeds_fail_with_a_dispatch_error() {
        // A port nothing listens on: bind, take the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let seeds = vec![format!("127.0.0.1:{port}")];
        let e = dispatch(&seeds, 0, "a", "u", "tcp", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Dispatch(_)), "{e}");
        let e = dispatch(&[], 0, "a", "u", "tcp", Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Dispatch(_)), "{e}");
    }
}
