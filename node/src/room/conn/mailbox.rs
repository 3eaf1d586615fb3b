//! The user's mailbox on a connection: pulling messages after the session's cursor from the
//! user's shard, gaps, ACKs.

use super::*;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) fn on_ack(&mut self, sid: u32, seq: u64) {
        let Some(i) = self.find(sid) else { return };
        let s = &mut self.sessions[i];
        // A client cannot ack what it was never sent.
        let seq = seq.min(s.delivered);
        if seq > s.acked {
            s.acked = seq;
            self.room
                .acks
                .record(&s.app, &s.user, &s.device, s.delivered, s.acked);
            self.room.stats.acks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads the next page of a session's mailbox into the output. True when a full page was read
    /// (more may follow).
    pub(super) fn pull_mailbox(&mut self, sid: u32, pushed: &mut Vec<u64>) -> bool {
        let Some(i) = self.find(sid) else { return false };
        let (app, user, device) = {
            let s = &self.sessions[i];
            (s.app.clone(), s.user.clone(), s.device.clone())
        };
        let reader = self.room.user_state(&app, &user);
        // Read the bound before the page, so a message stored in between is never taken for a hole.
        let before = match reader.mailbox_meta(&app, &user) {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "cannot read mailbox meta");
                return false;
            }
        };
        let from = self.sessions[i].delivered;
        let page = match reader.mailbox_since(&app, &user, from, PAGE) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read mailbox");
                return false;
            }
        };
        let full = page.len() == PAGE;
        let mut cursor = from;
        let mut holes = Vec::new();
        let mut frames = 0u64;
        for m in &page {
            if m.seq > cursor + 1 {
                holes.push((cursor + 1, m.seq - 1));
            }
            cursor = m.seq;
        }
        let last_known = before.next_seq.saturating_sub(1);
        if !full && last_known > cursor {
            holes.push((cursor + 1, last_known));
        }
        let meta = if holes.is_empty() {
            before
        } else {
            reader.mailbox_meta(&app, &user).ok().flatten().unwrap_or(before)
        };
        let mut hole_iter = holes.into_iter().peekable();
        for m in page {
            while let Some(&(a, b)) = hole_iter.peek() {
                if a > m.seq {
                    break;
                }
                self.gap(sid, a, b, &meta);
                hole_iter.next();
            }
            if m.payload.len() > self.room.config.max_frame.saturating_sub(frame::PUSH_HEADROOM) {
                // Only when nodes disagree on --max-frame (the push API refuses what does not
                // fit): the client would drop the connection on it and get it again on every
                // resume, so it is reported as a gap instead.
                warn!(app = %app, user = %user, seq = m.seq, size = m.payload.len(), "message exceeds the max frame; sent as a gap");
                self.room.stats.rejected_frames.fetch_add(1, Ordering::Relaxed);
                self.send(Kind::Gap(pc::Gap {
                    session_id: sid,
                    topic: String::new(),
                    from_seq: m.seq,
                    to_seq: m.seq,
                    reason: GapReason::TooLarge as i32,
                }));
                continue;
            }
            if m.devices.is_empty() || m.devices.iter().any(|d| **d == *device) {
                self.send(Kind::Push(pc::Push {
                    session_id: sid,
                    msg_id: m.msg_id,
                    seq: m.seq,
                    topic: String::new(),
                    topic_seq: 0,
                    payload: m.payload,
                    qos: Qos::AtLeastOnce as i32,
                    pushed_at_ms: m.pushed_ms,
                    expires_at_ms: m.expires_ms,
                    retain: pc::Retain::None as i32,
                }));
                frames += 1;
                pushed.push(m.pushed_ms);
            }
        }
        for (a, b) in hole_iter {
            self.gap(sid, a, b, &meta);
            cursor = cursor.max(b);
        }
        let s = &mut self.sessions[i];
        if cursor > s.delivered {
            s.delivered = cursor;
            self.room
                .acks
                .record(&s.app, &s.user, &s.device, s.delivered, s.acked);
        }
        self.room.stats.deliveries.fetch_add(frames, Ordering::Relaxed);
        full
    }

    /// Reports the part of a hole that was trimmed or expired (the rest was acked by every device
    /// it was for, or was for other devices).
    pub(super) fn gap(&mut self, sid: u32, a: u64, b: u64, meta: &MailboxMeta) {
        let trimmed_end = b.min(meta.trimmed_upto);
        if trimmed_end >= a {
            self.send(Kind::Gap(pc::Gap {
                session_id: sid,
                topic: String::new(),
                from_seq: a,
                to_seq: trimmed_end,
                reason: GapReason::Trimmed as i32,
            }));
        }
        let a2 = a.max(trimmed_end + 1);
        let expired_end = b.min(meta.expired_upto);
        if expired_end >= a2 {
            self.send(Kind::Gap(pc::Gap {
                session_id: sid,
                topic: String::new(),
                from_seq: a2,
                to_seq: expired_end,
                reason: GapReason::Expired as i32,
            }));
        }
    }
}
