//! The one place where errors become gRPC statuses.

use herald_raft::raft_node::MembershipError;
use herald_raft::{NodeId, Rejection, StoreError, WriteError};
use tonic::{Code, Status};

/// Metadata key naming the leader's gRPC address on UNAVAILABLE replies.
pub const LEADER_METADATA: &str = "x-herald-leader";
/// Metadata key naming the leader's node id on UNAVAILABLE replies. The errors below only know
/// the leader's cluster address; the public server's `leader_hint` layer turns the id into the
/// leader's public gRPC address (`LEADER_METADATA`), so no reply shows a cluster address.
pub const LEADER_ID_METADATA: &str = "x-herald-leader-id";

/// Everything an API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{msg}")]
    Unavailable {
        msg: String,
        leader: Option<(NodeId, String)>,
    },
    #[error("{0}")]
    Indeterminate(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Unavailable { leader } => ApiError::Unavailable {
                msg: e_to_string(&leader),
                leader,
            },
            WriteError::Indeterminate(m) => ApiError::Indeterminate(format!(
                "the write may or may not have committed ({m}); retry with the same idempotency key"
            )),
            WriteError::Shutdown => ApiError::Unavailable {
                msg: "node is shutting down".into(),
                leader: None,
            },
            WriteError::Invalid(m) => ApiError::InvalidArgument(m),
        }
    }
}

fn e_to_string(leader: &Option<(NodeId, String)>) -> String {
    WriteError::Unavailable {
        leader: leader.clone(),
    }
    .to_string()
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::UnknownApp(a) => ApiError::NotFound(format!("unknown app {a:?}")),
            Rejection::PayloadTooLarge { .. } => ApiError::InvalidArgument(r.to_string()),
            Rejection::Invalid(m) => ApiError::InvalidArgument(m),
            Rejection::MsgIdInUse(_) => ApiError::AlreadyExists(r.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<MembershipError> for ApiError {
    fn from(e: MembershipError) -> Self {
        let msg = e.to_string();
        match e {
            MembershipError::NotLeader(leader) => ApiError::Unavailable { msg, leader },
            MembershipError::Refused(m) => ApiError::FailedPrecondition(m),
            MembershipError::CatchUpTimeout(_) => ApiError::Unavailable {
                msg: e.to_string(),
                leader: None,
            },
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = match &e {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable { .. } => Code::Unavailable,
            ApiError::Indeterminate(_) => Code::DeadlineExceeded,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Internal(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        if let ApiError::Unavailable {
            leader: Some((id, addr)),
            ..
        } = &e
        {
            if let Ok(v) = addr.parse() {
                status.metadata_mut().insert(LEADER_METADATA, v);
            }
            if let Ok(v) = id.to_string().parse() {
                status.metadata_mut().insert(LEADER_ID_METADATA, v);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_is_unavailable_with_the_leader_address() {
        let s: Status = ApiError::from(WriteError::Unavailable {
            leader: Some((2, "127.0.0.1:7002".into())),
        })
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_METADATA).unwrap(), "127.0.0.1:7002");
        assert_eq!(s.metadata().get(LEADER_ID_METADATA).unwrap(), "2");
        assert!(s.message().contains("node 2"));
    }

    #[test]
    fn indeterminate_writes_say_so() {
        let s: Status = ApiError::from(WriteError::Indeterminate("timeout".into())).into();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(s.message().contains("may or may not"));
    }
}
