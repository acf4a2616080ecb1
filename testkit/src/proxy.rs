//! A fault-injecting TCP proxy for one directed link between two nodes' peer services.
//!
//! Passing, it copies bytes both ways. Blackholed, it swallows whatever arrives and sends
//! nothing on, without closing anything: a peer sees silence, as in a real partition. Healing
//! closes the connections that lived through the blackhole (their streams lost bytes), so the
//! nodes reconnect cleanly.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a link does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
}

/// Serves `listener`, forwarding to `target` as `mode` says, until the runtime stops.
pub async fn run(listener: TcpListener, target: SocketAddr, mode: watch::Receiver<Mode>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let _ = inbound.set_nodelay(true);
        tokio::spawn(connection(inbound, target, mode.clone()));
    }
}

async fn connection(mut inbound: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let started = *mode.borrow_and_update();
    if started == Mode::Blackhole {
        swallow(&mut inbound, &mut mode).await;
        return;
    }
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (mut a, mut b) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let blackholed = *mode.borrow() == Mode::Blackhole;
        tokio::select! {
            r = inbound.read(&mut a) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) if !blackholed => if outbound.write_all(&a[..n]).await.is_err() { return },
                Ok(_) => {}
            },
            r = outbound.read(&mut b) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) if !blackholed => if inbound.write_all(&b[..n]).await.is_err() { return },
                Ok(_) => {}
            },
            changed = mode.changed() => {
                // A heal after a blackhole: this connection lost bytes; close it.
                if changed.is_err() || (blackholed && *mode.borrow() == Mode::Pass) {
                    return;
                }
            }
        }
    }
}

/// Reads and drops everything until the link is healed, then closes.
async fn swallow(inbound: &mut TcpStream, mode: &mut watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            r = inbound.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
            changed = mode.changed() => if changed.is_err() || *mode.borrow() == Mode::Pass { return },
        }
    }
}
