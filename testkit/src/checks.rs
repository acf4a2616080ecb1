//! Checks a test makes against a server: what an error says, and what health reports.

use sequencer_client::ClientError;

pub use tonic_health::pb::health_check_response::ServingStatus;

/// Asserts that `res` failed with `code` and a message that mentions `mentions`.
pub fn assert_code<T: std::fmt::Debug>(
    res: Result<T, ClientError>,
    code: tonic::Code,
    mentions: &str,
) {
    match res {
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), code, "{e}");
            assert!(
                e.to_string().contains(mentions),
                "error `{e}` does not mention `{mentions}`"
            );
        }
    }
}

/// The gRPC health of the server at `addr` (plaintext), or `None` if it does not answer.
pub async fn health(addr: &str) -> Option<ServingStatus> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let req = HealthCheckRequest {
        service: String::new(),
    };
    let resp = HealthClient::new(channel).check(req).await.ok()?;
    ServingStatus::try_from(resp.into_inner().status).ok()
}
