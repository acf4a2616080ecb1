//! Moving a call between servers until one answers or the deadline passes. One attempt on one
//! server ([`attempt`]) is kept apart from the loop that decides where to go next
//! ([`RetryPolicy::call`]).

use std::future::Future;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::transport::Server;
use crate::ClientError;

/// The first pause after a round over every server failed; it doubles each round.
const FIRST_BACKOFF: Duration = Duration::from_millis(25);

/// How long a call may take, in one attempt and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// The longest one attempt on one server may take before the call tries the next.
    pub(crate) rpc_timeout: Duration,
    /// How long the whole call may go on, pauses included. No attempt runs past it.
    pub(crate) deadline: Duration,
    /// The longest pause between two rounds over every server.
    pub(crate) max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(6),
            deadline: Duration::from_secs(15),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// How one attempt on one server ended.
#[derive(Debug)]
pub(crate) enum AttemptOutcome<T> {
    Answered(T),
    /// The server is down, has no primary, or broke off: another server may serve the call.
    /// tonic reports a connection reset mid-call (a server killed) as UNKNOWN. Retrying an id
    /// request whose fate is unknown is safe: at worst it burns ids, it never repeats one.
    Retryable(Status),
    /// An answer that another server would give too (bad input, limits).
    Rejected(Status),
    /// No answer within the attempt's time. A hung server (paused, cut off) sends no reset.
    TimedOut,
}

/// One call on one server, given at most `budget`.
pub(crate) async fn attempt<T>(
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    budget: Duration,
) -> AttemptOutcome<T> {
    match tokio::time::timeout(budget, call).await {
        Ok(Ok(resp)) => AttemptOutcome::Answered(resp.into_inner()),
        Ok(Err(status)) if retryable(status.code()) => AttemptOutcome::Retryable(status),
        Ok(Err(status)) => AttemptOutcome::Rejected(status),
        Err(_) => AttemptOutcome::TimedOut,
    }
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

impl RetryPolicy {
    /// For heartbeats, which are only useful on time: each server gets half an `interval` to
    /// answer and the pause between rounds stays under a quarter, so a hung server is left
    /// behind well before the primary's failure timeout.
    pub(crate) fn for_heartbeat(&self, interval: Duration) -> Self {
        Self {
            rpc_timeout: interval / 2,
            max_backoff: interval / 4,
            ..*self
        }
    }

    /// For Admin calls, which may rightly take minutes (a learner catching up): one attempt
    /// may take the whole `deadline`. One that times out is not repeated elsewhere, since the
    /// deadline is then spent; a server that is down or has no primary is still left at once.
    pub(crate) fn for_admin(&self, deadline: Duration) -> Self {
        Self {
            rpc_timeout: deadline,
            deadline,
            ..*self
        }
    }

    /// Calls `f` on `servers[first]`, then on the next server after each retryable failure,
    /// pausing after each full round, until one answers or the deadline passes. Each attempt
    /// gets `rpc_timeout` or what is left of the deadline, whichever is less. Returns the index
    /// of the server that answered.
    ///
    /// A server is not tried again with less time left than its last attempt took (the others
    /// still are): a request the call could not wait for would stay behind on the server,
    /// where it may still take effect (burn an id) after the call has failed.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        servers: &[Server],
        first: usize,
        f: F,
    ) -> Result<(usize, T), ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.deadline;
        let n = servers.len();
        let mut backoff = FIRST_BACKOFF.min(self.max_backoff);
        // How the last attempt that ended on its own ended: an attempt the deadline cuts short
        // says nothing about its server, so the error names this one.
        let mut last: Option<(&Server, Status)> = None;
        // How long each server's last failed attempt took.
        let mut took: Vec<Option<Duration>> = vec![None; n];
        let mut tries = 0usize;
        loop {
            let i = (first + tries) % n;
            let server = &servers[i];
            let left = deadline.saturating_duration_since(Instant::now());
            let too_slow = |t: &Option<Duration>| t.is_some_and(|t| t > left);
            if left.is_zero() || took.iter().all(too_slow) {
                return Err(self.out_of_time(server, last));
            }
            if too_slow(&took[i]) {
                // This one cannot be waited for; another server may answer sooner.
                tries += 1;
                continue;
            }
            let budget = self.rpc_timeout.min(left);
            let started = Instant::now();
            let status = match attempt(f(server.channel.clone()), budget).await {
                AttemptOutcome::Answered(resp) => return Ok((i, resp)),
                AttemptOutcome::Rejected(status) => {
                    return Err(ClientError::Rejected {
                        server: server.addr.clone(),
                        status,
                    })
                }
                AttemptOutcome::Retryable(status) => status,
                AttemptOutcome::TimedOut if budget < self.rpc_timeout => {
                    return Err(self.out_of_time(server, last));
                }
                AttemptOutcome::TimedOut => {
                    Status::deadline_exceeded(format!("no answer within {budget:?}"))
                }
            };
            tracing::debug!(server = %server.addr, %status, "server unavailable; trying the next");
            took[i] = Some(started.elapsed());
            last = Some((server, status));
            tries += 1;
            // A full round failed: the cluster may be electing. Back off a little.
            if tries.is_multiple_of(n) {
                sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                backoff = (backoff * 2).min(self.max_backoff);
            }
        }
    }

    /// The error of a call that ran out of time: what `last` said, or else that `server` did
    /// not answer within the deadline.
    fn out_of_time(&self, server: &Server, last: Option<(&Server, Status)>) -> ClientError {
        let (server, status) = last.unwrap_or_else(|| {
            let status = Status::deadline_exceeded(format!(
                "no answer within the call's deadline of {:?}",
                self.deadline
            ));
            (server, status)
        });
        ClientError::Unavailable {
            server: server.addr.clone(),
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn servers(n: usize) -> Vec<Server> {
        (0..n)
            .map(|i| {
                Server::new(
                    &format!("127.0.0.1:{}", i + 1),
                    Duration::from_secs(1),
                    None,
                )
            })
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Attempts that answer at once.
    const NOW: Duration = Duration::ZERO;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn policy(rpc_timeout_ms: u64, deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            rpc_timeout: Duration::from_millis(rpc_timeout_ms),
            deadline: Duration::from_millis(deadline_ms),
            max_backoff: Duration::from_millis(10),
        }
    }

    /// Runs a call whose attempt number k (from 0) answers as `script(k)` says (`None`: never),
    /// after `delay`. Returns the result and the number of attempts.
    async fn scripted(
        policy: RetryPolicy,
        n: usize,
        first: usize,
        delay: Duration,
        script: impl Fn(usize) -> Option<Result<u64, Status>>,
    ) -> (Result<(usize, u64), ClientError>, usize) {
        let calls = AtomicUsize::new(0);
        let res = policy
            .call(&servers(n), first, |_| {
                let answer = script(calls.fetch_add(1, Ordering::SeqCst));
                async move {
                    tokio::time::sleep(delay).await;
                    match answer {
                        Some(res) => res.map(tonic::Response::new),
                        None => std::future::pending().await,
                    }
                }
            })
            .await;
        (res, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_retryable_error_moves_the_call_to_the_next_server_in_turn() {
        let (res, calls) = scripted(policy(1000, 5000), 3, 2, NOW, |k| {
            Some(match k {
                0 => Err(Status::unavailable("no primary")),
                1 => Err(Status::unknown("connection reset")),
                _ => Ok(7),
            })
        })
        .await;
        // From server 2 on: 2, 0, then 1 answers.
        assert_eq!(res.unwrap(), (1, 7));
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn a_rejection_comes_back_at_once_with_its_status() {
        let (res, calls) = scripted(policy(1000, 5000), 3, 0, NOW, |_| {
            Some(Err(Status::invalid_argument("bad name")))
        })
        .await;
        match res {
            Err(ClientError::Rejected { server, status }) => {
                assert_eq!(server, "127.0.0.1:1");
                assert_eq!(status.code(), Code::InvalidArgument);
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(calls, 1, "a rejection was retried");
    }

    #[tokio::test]
    async fn a_hung_server_is_left_after_the_rpc_timeout() {
        let (res, calls) =
            scripted(policy(100, 5000), 2, 0, NOW, |k| (k > 0).then_some(Ok(1))).await;
        assert_eq!(res.unwrap(), (1, 1));
        assert_eq!(calls, 2);
    }

    #[tokio::test]
    async fn no_attempt_outlasts_the_deadline() {
        let started = Instant::now();
        let (res, _) = scripted(policy(10_000, 300), 2, 0, NOW, |_| None).await;
        let took = started.elapsed();
        let err = res.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(
            (ms(300)..ms(1300)).contains(&took),
            "a 300 ms call took {took:?}"
        );
    }

    #[tokio::test]
    async fn an_attempt_cut_short_by_the_deadline_reports_the_last_answer_a_server_gave() {
        let (res, calls) = scripted(policy(10_000, 300), 2, 0, NOW, |k| {
            (k == 0).then(|| Err(Status::unavailable("no primary")))
        })
        .await;
        let err = res.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        assert_eq!(calls, 2);
    }

    #[tokio::test]
    async fn a_server_is_not_tried_again_with_less_time_left_than_it_took() {
        let started = Instant::now();
        // 200 ms to say UNAVAILABLE, then 100 ms left: not enough for another such answer.
        let (res, calls) = scripted(policy(10_000, 300), 1, 0, ms(200), |_| {
            Some(Err(Status::unavailable("no primary")))
        })
        .await;
        let err = res.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert_eq!(calls, 1, "a retry the deadline would cut short was started");
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_server_too_slow_for_the_time_left_is_skipped_and_the_others_are_still_tried() {
        let calls = AtomicUsize::new(0);
        let res = policy(10_000, 300)
            .call(&servers(2), 0, |_| {
                let k = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match k {
                        // Server 0 takes 200 ms to say no; server 1 says no at once, then yes.
                        0 => {
                            tokio::time::sleep(ms(200)).await;
                            Err(Status::unavailable("no primary"))
                        }
                        1 => Err(Status::unavailable("no primary")),
                        _ => Ok(tonic::Response::new(5u64)),
                    }
                }
            })
            .await;
        assert_eq!(res.unwrap(), (1, 5));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "server 0 was tried again");
    }

    #[tokio::test]
    async fn a_zero_deadline_gives_up_without_calling() {
        let (res, calls) = scripted(policy(1000, 0), 1, 0, NOW, |_| Some(Ok(1))).await;
        assert_eq!(res.unwrap_err().code(), Code::DeadlineExceeded);
        assert_eq!(calls, 0);
    }

    #[tokio::test]
    async fn an_admin_attempt_may_take_the_whole_deadline_and_is_not_repeated_after_it() {
        let admin = policy(100, 5000).for_admin(ms(300));
        assert_eq!(admin.rpc_timeout, ms(300));
        assert_eq!(admin.deadline, ms(300));
        // Answers after 200 ms, twice the ordinary RPC timeout: still in time.
        let (res, calls) = scripted(admin, 2, 0, ms(200), |_| Some(Ok(3))).await;
        assert_eq!(res.unwrap(), (0, 3));
        assert_eq!(calls, 1);
        // No answer: the one attempt ends at the deadline, and no other server is tried.
        let (res, calls) = scripted(admin, 2, 0, NOW, |_| None).await;
        assert_eq!(res.unwrap_err().code(), Code::DeadlineExceeded);
        assert_eq!(calls, 1, "a timed-out admin call was sent again");
        // A server that is down is still left for the next.
        let (res, calls) = scripted(admin, 2, 0, NOW, |k| {
            Some(if k == 0 {
                Err(Status::unavailable("connection refused"))
            } else {
                Ok(4)
            })
        })
        .await;
        assert_eq!(res.unwrap(), (1, 4));
        assert_eq!(calls, 2);
    }

    #[test]
    fn heartbeats_get_half_an_interval_per_attempt_and_the_same_deadline() {
        let p = RetryPolicy::default().for_heartbeat(Duration::from_millis(1000));
        assert_eq!(
            p,
            RetryPolicy {
                rpc_timeout: Duration::from_millis(500),
                deadline: RetryPolicy::default().deadline,
                max_backoff: Duration::from_millis(250),
            }
        );
    }
}
