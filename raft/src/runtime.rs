//! openraft's async runtime for Herald: tokio, except that no timeout openraft sets on a Raft RPC
//! is shorter than [`RPC_TIMEOUT_FLOOR`].
//!
//! openraft 0.9 gives every AppendEntries, heartbeat and linearizable-read probe the heartbeat
//! interval as its timeout (`replication::send_log_entries`, `RaftCore::ensure_linearizable`).
//! Herald's heartbeat is 50 ms so that a dead leader is noticed quickly; on a loaded machine a
//! follower's answer can take longer than that (an fsync stall of the disk, a core busy elsewhere).
//! Each such timeout makes the leader drop the request (the follower keeps working on it), report
//! a replication error and send the whole in-flight range again at once; measured in the tail
//! benchmark, one slow moment became a chain of 50 ms timeouts and resends to both followers and a
//! 200-330 ms stall of every push. With the floor the leader waits for the follower's answer.
//! The raft transport applies the same floor to the deadline of its AppendEntries and Vote calls
//! (`network::raft_network`), which openraft hands the same short time.
//!
//! What does not change: the heartbeat and election timers (they are sleeps, not timeouts), so
//! failover takes as long as before; a peer that is down fails at once (connection refused) or
//! after the transport's connect timeout. A peer that is cut off without an error (packets
//! dropped) now holds its replication stream for up to the floor per attempt instead of 50 ms;
//! the other members' streams are separate tasks, so commits by the majority are not delayed.

use std::future::Future;
use std::time::Duration;

use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};

/// The shortest timeout openraft may put on a Raft RPC.
pub const RPC_TIMEOUT_FLOOR: Duration = Duration::from_secs(1);

/// [`TokioRuntime`] with [`RPC_TIMEOUT_FLOOR`] under every timeout.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeraldRuntime;

type Tokio = TokioRuntime;

impl AsyncRuntime for HeraldRuntime {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as AsyncRuntime>::Sleep;
    type Instant = <Tokio as AsyncRuntime>::Instant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = <Tokio as AsyncRuntime>::ThreadLocalRng;
    type OneshotSender<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <Tokio as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <Tokio as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Tokio::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout(floored(duration), future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        let earliest = Self::Instant::now() + RPC_TIMEOUT_FLOOR;
        Tokio::timeout_at(deadline.max(earliest), future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        Tokio::thread_rng()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        Tokio::oneshot()
    }
}

fn floored(d: Duration) -> Duration {
    d.max(RPC_TIMEOUT_FLOOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_short_timeout_waits_for_the_floor() {
        // openraft would give this request 50 ms; it answers after 300 ms and is not cut off.
        let slow = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            7
        };
        assert_eq!(
            HeraldRuntime::timeout(Duration::from_millis(50), slow).await.ok(),
            Some(7)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_slower_than_the_floor_still_times_out() {
        let stuck = std::future::pending::<()>();
        let t0 = tokio::time::Instant::now();
        assert!(HeraldRuntime::timeout(Duration::from_millis(50), stuck)
            .await
            .is_err());
        assert_eq!(t0.elapsed(), RPC_TIMEOUT_FLOOR);
        let deadline = <HeraldRuntime as AsyncRuntime>::Instant::now() + Duration::from_millis(10);
        let t1 = tokio::time::Instant::now();
        assert!(HeraldRuntime::timeout_at(deadline, std::future::pending::<()>())
            .await
            .is_err());
        assert_eq!(t1.elapsed(), RPC_TIMEOUT_FLOOR);
    }

    #[tokio::test(start_paused = true)]
    async fn longer_timeouts_are_kept() {
        let t0 = tokio::time::Instant::now();
        let long = Duration::from_secs(5);
        assert!(HeraldRuntime::timeout(long, std::future::pending::<()>())
            .await
            .is_err());
        assert_eq!(t0.elapsed(), long);
    }
}
