//! Fencing by epoch: once a newer session of a device is registered (a higher epoch), the older
//! session of that device must not be handed anything committed after that registration. Its node
//! has to end it (KICKED `replaced`) when it applies the newer registration.
//!
//! Epochs count registrations cluster-wide; they are not log indexes, so the order between a
//! registration and a push is taken from real time: a push invoked after the newer registration
//! was acknowledged (WELCOME) commits after it. Checked on mailbox deliveries of acknowledged
//! pushes: a delivery to client instance C (epoch e) of a message whose push was invoked after
//! another instance of the same (user, device) got WELCOME with an epoch above e is stale.

use std::collections::HashMap;

use super::{CheckResult, Index};
use crate::history::{Type, F};

/// (user, device).
type Device<'a> = (&'a str, &'a str);

pub fn check(idx: &Index<'_>) -> CheckResult {
    let mut r = CheckResult::new("fencing");
    // (user, device) → [(epoch, client, op index, time acknowledged)] of every registration.
    let mut regs: HashMap<Device<'_>, Vec<(u64, u64, u64, u64)>> = HashMap::new();
    for o in idx.history {
        if !matches!(o.f, F::Connect | F::Reconnect) || o.kind != Type::Ok {
            continue;
        }
        let (Some(u), Some(d), Some(c), Some(e)) = (
            o.value.user.as_deref(),
            o.value.device.as_deref(),
            o.value.client,
            o.value.epoch,
        ) else {
            continue;
        };
        regs.entry((u, d)).or_default().push((e, c, o.index, o.time_us));
    }
    let mut checked = 0u64;
    for o in &idx.recvs {
        if o.value.topic.is_some() {
            continue;
        }
        let (Some(u), Some(d), Some(c), Some(my_epoch), Some(msg)) = (
            o.value.user.as_deref(),
            o.value.device.as_deref(),
            o.value.client,
            o.value.epoch,
            o.value.msg_id.as_deref(),
        ) else {
            continue;
        };
        let Some(sent) = idx.sent.get(msg) else { continue };
        let Some(l) = sent.log_index else { continue };
        let pushed_at = sent.pair.invoke.time_us;
        checked += 1;
        let Some(others) = regs.get(&(u, d)) else { continue };
        if let Some(&(newer, other, op, _)) = others
            .iter()
            .filter(|(e, cl, _, at)| *cl != c && *e > my_epoch && *at < pushed_at)
            .min_by_key(|(e, _, _, _)| *e)
        {
            r.violation(
                "stale-session-delivery",
                format!(
                    "{msg} (committed at index {l}) was delivered to client {c} of {u}/{d} with epoch {my_epoch}, \
                     although client {other} had registered the device with epoch {newer}"
                ),
                vec![op, o.index],
            );
        }
    }
    r.stats = serde_json::json!({ "deliveries_checked": checked });
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::{Index, Validity};

    fn recv_with_epoch(h: &mut H, t: u64, client: u64, msg: &str, seq: u64, epoch: u64) {
        let i = h.recv(t, client, "u1", msg, seq) as usize;
        h.ops[i].value.epoch = Some(epoch);
    }

    #[test]
    fn deliveries_before_the_newer_login_pass() {
        let mut h = H::new();
        h.connected(0, 100, "u1", "d", 5, 1);
        h.pushed(2, 10, "u1", "m1", 1, 8);
        recv_with_epoch(&mut h, 4, 100, "m1", 1, 5);
        h.connected(6, 101, "u1", "d", 12, 2);
        h.pushed(8, 10, "u1", "m2", 2, 15);
        recv_with_epoch(&mut h, 10, 101, "m2", 2, 12);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
    }

    #[test]
    fn a_message_pushed_before_the_newer_login_was_acknowledged_passes() {
        // Epochs are not log indexes: the message's index (15) is above the newer epoch (12), but
        // its push began before that login was acknowledged, so the old session may get it.
        let mut h = H::new();
        h.connected(0, 100, "u1", "d", 5, 1);
        h.pushed(2, 10, "u1", "m1", 1, 15);
        recv_with_epoch(&mut h, 4, 100, "m1", 1, 5);
        h.connected(6, 101, "u1", "d", 12, 2);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Valid, "{r:?}");
    }

    #[test]
    fn the_replaced_session_getting_a_later_message_fails() {
        let mut h = H::new();
        h.connected(0, 100, "u1", "d", 5, 1);
        h.connected(6, 101, "u1", "d", 12, 2);
        h.pushed(8, 10, "u1", "m2", 2, 15);
        recv_with_epoch(&mut h, 10, 101, "m2", 2, 12);
        recv_with_epoch(&mut h, 11, 100, "m2", 2, 5);
        let r = check(&Index::new(&h.ops));
        assert_eq!(r.valid, Validity::Invalid);
        assert_eq!(r.count, 1);
        assert!(r.violations[0].detail.contains("epoch 12"), "{r:?}");
    }
}
