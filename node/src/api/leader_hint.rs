//! The public server's view of "not leader" replies.
//!
//! Errors built inside the node know the leader by its id and its *cluster* address (the address
//! Raft membership holds). A caller of the public API must be pointed at the leader's *public*
//! gRPC address instead, and must not learn cluster addresses from us. This layer runs on every
//! public reply: where a reply names a leader id (`x-herald-leader-id`), it sets
//! `x-herald-leader` to that node's advertised gRPC address from the replicated node table, or
//! removes it when the table does not know the node yet; the id header stays (it is public).

use herald_raft::StateReader;
use http::HeaderValue;

use super::error::{LEADER_ID_METADATA, LEADER_METADATA};

/// The layer to put on the public gRPC server.
pub fn layer(
    reader: StateReader,
) -> tower::util::MapResponseLayer<
    impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone,
> {
    tower::util::MapResponseLayer::new(move |mut res: http::Response<tonic::body::Body>| {
        rewrite(res.headers_mut(), |id| public_addr(&reader, id));
        res
    })
}

fn public_addr(reader: &StateReader, id: u64) -> Option<String> {
    reader
        .nodes()
        .ok()?
        .into_iter()
        .find(|n| n.id == id)
        .map(|n| n.grpc_addr)
        .filter(|a| !a.is_empty())
}

/// Replaces the leader address by `lookup(leader id)`'s answer, or drops it.
fn rewrite(headers: &mut http::HeaderMap, lookup: impl Fn(u64) -> Option<String>) {
    let Some(id) = headers
        .get(LEADER_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        // No id: nothing here can name a cluster address (every leader hint carries its id).
        return;
    };
    match lookup(id).and_then(|a| HeaderValue::from_str(&a).ok()) {
        Some(v) => {
            headers.insert(LEADER_METADATA, v);
        }
        None => {
            headers.remove(LEADER_METADATA);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_address_becomes_the_public_one_or_goes() {
        let mut h = http::HeaderMap::new();
        h.insert(LEADER_METADATA, HeaderValue::from_static("10.0.0.2:7501"));
        h.insert(LEADER_ID_METADATA, HeaderValue::from_static("2"));
        rewrite(&mut h, |id| (id == 2).then(|| "203.0.113.2:7401".to_string()));
        assert_eq!(h.get(LEADER_METADATA).unwrap(), "203.0.113.2:7401");
        assert_eq!(h.get(LEADER_ID_METADATA).unwrap(), "2");

        let mut h = http::HeaderMap::new();
        h.insert(LEADER_METADATA, HeaderValue::from_static("10.0.0.3:7501"));
        h.insert(LEADER_ID_METADATA, HeaderValue::from_static("3"));
        rewrite(&mut h, |_| None);
        assert!(h.get(LEADER_METADATA).is_none());
    }
}
