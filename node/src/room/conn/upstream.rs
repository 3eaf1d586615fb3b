//! UPSTREAM: a client message for the app's backend, handed to the coordinator; its reply or
//! failure goes back on the connection.

use super::*;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) fn on_upstream(&mut self, u: pc::Upstream) {
        let Some(i) = self.find(u.session_id) else {
            self.send(Kind::UpstreamReply(pc::UpstreamReply {
                session_id: u.session_id,
                request_id: u.request_id,
                payload: Bytes::new(),
                error: ErrorCode::UnknownSession as i32,
                message: "no such session".into(),
            }));
            return;
        };
        let s = &self.sessions[i];
        let app = match self.room.meta().app(&s.app) {
            Ok(Some(a)) => a,
            _ => {
                self.send(upstream_error(
                    u.session_id,
                    u.request_id,
                    ErrorCode::UnknownApp,
                    "unknown app",
                ));
                return;
            }
        };
        let shared = self.shared.clone();
        let sid = u.session_id;
        let rid = u.request_id;
        let fits = self.room.config.max_frame.saturating_sub(frame::PUSH_HEADROOM);
        match self
            .room
            .coordinator
            .upstream(&app, self.shared.id, &s.user, &s.device, rid, u.payload)
        {
            Ok(rx) => {
                tokio::spawn(async move {
                    let reply = match rx.await {
                        Ok(Ok(payload)) if payload.len() > fits => {
                            warn!(size = payload.len(), fits, "backend reply exceeds the max frame");
                            let msg = format!(
                                "the backend's reply of {} bytes does not fit in a frame ({fits} bytes)",
                                payload.len()
                            );
                            upstream_error(sid, rid, ErrorCode::UpstreamFailed, &msg).into_reply()
                        }
                        Ok(Ok(payload)) => pc::UpstreamReply {
                            session_id: sid,
                            request_id: rid,
                            payload,
                            error: 0,
                            message: String::new(),
                        },
                        Ok(Err(e)) => {
                            let code = match e {
                                UpstreamFailure::Failed { .. } => ErrorCode::UpstreamFailed,
                                UpstreamFailure::Unavailable(_) => ErrorCode::UpstreamUnavailable,
                            };
                            upstream_error(sid, rid, code, &e.to_string()).into_reply()
                        }
                        Err(_) => {
                            upstream_error(sid, rid, ErrorCode::UpstreamUnavailable, "node shutting down")
                                .into_reply()
                        }
                    };
                    shared.push(crate::room::outbox::Outbound::Frame(frame::encode_to_bytes(
                        &Frame {
                            kind: Some(Kind::UpstreamReply(reply)),
                        },
                    )));
                });
            }
            Err(e) => self.send(upstream_error(
                sid,
                rid,
                ErrorCode::UpstreamUnavailable,
                &e.to_string(),
            )),
        }
    }
}

/// An UPSTREAM_REPLY carrying an error.
pub(super) struct UpstreamErr(pc::UpstreamReply);

impl UpstreamErr {
    pub(super) fn into_reply(self) -> pc::UpstreamReply {
        self.0
    }
}

impl From<UpstreamErr> for Kind {
    fn from(e: UpstreamErr) -> Kind {
        Kind::UpstreamReply(e.0)
    }
}

pub(super) fn upstream_error(sid: u32, rid: u64, code: ErrorCode, msg: &str) -> UpstreamErr {
    UpstreamErr(pc::UpstreamReply {
        session_id: sid,
        request_id: rid,
        payload: Bytes::new(),
        error: code as i32,
        message: msg.into(),
    })
}
