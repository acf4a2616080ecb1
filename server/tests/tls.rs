//! TLS on both listeners and mutual TLS between peers, with certificates from
//! `client gen-certs`: TLS clients are served on every node (followers forward over mTLS),
//! plaintext clients and peers without a certificate from the cluster's CA are not.

use std::path::Path;

use sequencer_client::{Client, Tls};
use sequencer_proto::peer::peer_client::PeerClient;
use sequencer_proto::peer::PingRequest;
use testkit::{sibling_binary, Cluster};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// Pings node `id`'s peer listener with the cluster secret over TLS, showing `identity`.
async fn peer_ping(
    cluster: &Cluster,
    id: u64,
    ca: &[u8],
    identity: Option<Identity>,
) -> Result<u32, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    let endpoint = Endpoint::from_shared(format!("https://{}", cluster.node(id).peer_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut req = tonic::Request::new(PingRequest {});
    let secret = cluster.cluster_secret().unwrap().parse().unwrap();
    req.metadata_mut().insert("x-cluster-secret", secret);
    PeerClient::new(channel)
        .ping(req)
        .await
        .map(|r| r.into_inner().node_id)
        .map_err(|s| s.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_are_served_everywhere_and_peers_need_a_cluster_certificate() {
    let dir = tempfile::tempdir().unwrap();
    testkit::gen_certs(&sibling_binary(SERVER, "client"), dir.path(), 3).unwrap();
    let certs = dir.path().join("certs");
    let mut cluster = Cluster::builder(SERVER).tls(&certs, false).start().unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();

    // Every node serves TLS clients; followers reach the primary over mutual TLS.
    let mut last = 0;
    for id in cluster.ids() {
        let id_got = cluster.client_for(id).get_id("").await.unwrap();
        assert!(id_got.id > last, "node {id}: {} after {last}", id_got.id);
        last = id_got.id;
    }
    assert!(cluster.ids().iter().any(|&id| id != primary));

    // Plaintext is not served.
    let plain = Client::new([cluster.node(1).addr.clone()])
        .unwrap()
        .with_deadline(std::time::Duration::from_secs(2));
    assert!(
        plain.get_id("").await.is_err(),
        "a plaintext client got an id"
    );

    // A TLS client that does not trust the cluster's CA refuses the server.
    let other = tempfile::tempdir().unwrap();
    testkit::gen_certs(&sibling_binary(SERVER, "client"), other.path(), 3).unwrap();
    let stranger_ca = Tls {
        ca: Some(read(&other.path().join("certs"), "ca.pem")),
        identity: None,
    };
    let wrong_ca = Client::new([cluster.node(1).addr.clone()])
        .unwrap()
        .with_deadline(std::time::Duration::from_secs(2))
        .with_tls(stranger_ca)
        .unwrap();
    assert!(wrong_ca.get_id("").await.is_err(), "trusted a foreign CA");

    // The peer listener: with the secret and a cluster certificate, yes; without a
    // certificate, or with one from another CA, the handshake fails.
    let ca = read(&certs, "ca.pem");
    let node_cert = Identity::from_pem(read(&certs, "node-2.pem"), read(&certs, "node-2-key.pem"));
    assert_eq!(peer_ping(&cluster, 1, &ca, Some(node_cert)).await, Ok(1));
    assert!(
        peer_ping(&cluster, 1, &ca, None).await.is_err(),
        "a peer without a certificate was let in"
    );
    let foreign = other.path().join("certs");
    let foreign_cert = Identity::from_pem(
        read(&foreign, "node-2.pem"),
        read(&foreign, "node-2-key.pem"),
    );
    assert!(
        peer_ping(&cluster, 1, &ca, Some(foreign_cert))
            .await
            .is_err(),
        "a certificate from another CA was let in"
    );
    cluster.kill_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_auth_only_clients_with_a_certificate_are_served() {
    let dir = tempfile::tempdir().unwrap();
    testkit::gen_certs(&sibling_binary(SERVER, "client"), dir.path(), 3).unwrap();
    let certs = dir.path().join("certs");
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .tls(&certs, true)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    // The cluster's own client shows client.pem.
    cluster.client().get_id("").await.unwrap();
    let no_cert = Client::new([cluster.node(1).addr.clone()])
        .unwrap()
        .with_deadline(std::time::Duration::from_secs(2))
        .with_tls(Tls {
            ca: Some(read(&certs, "ca.pem")),
            identity: None,
        })
        .unwrap();
    assert!(
        no_cert.get_id("").await.is_err(),
        "served a client without a certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_speaks_tls_when_the_grpc_ones_do() {
    let dir = tempfile::tempdir().unwrap();
    testkit::gen_certs(&sibling_binary(SERVER, "client"), dir.path(), 1).unwrap();
    let certs = dir.path().join("certs");
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .tls(&certs, false)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    let addr = cluster.node(1).http_addr.clone();
    let ca = read(&certs, "ca.pem");
    let health = testkit::http::request("GET", &addr, "/healthz", Some(&ca))
        .await
        .unwrap();
    assert_eq!(health.status, 200, "{}", health.text());
    let id = testkit::http::request("POST", &addr, "/v1/sequences/tls/next", Some(&ca))
        .await
        .unwrap();
    assert_eq!(id.json().unwrap()["id"], 1, "{}", id.text());
    // Plain HTTP gets no answer from a TLS listener.
    let plain = testkit::http::get(&addr, "/healthz").await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // Nor does a caller that does not trust the cluster's CA.
    let other =
        testkit::http::request("GET", &addr, "/healthz", Some(&read(&certs, "node-1.pem"))).await;
    assert!(other.is_err(), "{other:?}");
}
