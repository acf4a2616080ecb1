//! Free TCP ports for test nodes, from a range the kernel never hands out on its own.

use std::net::TcpListener;

use anyhow::bail;

/// Where [`free_ports`] looks: below Linux's default ephemeral range (32768–60999). A port the
/// kernel picked (bind to port 0) is free only until the node binds it, and meanwhile any
/// outgoing connection of a test running beside it may take it as its local port; CI saw a
/// node refused with "Address already in use" that way. The kernel never hands out ports from
/// this range on its own.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_768;

/// `n` distinct free TCP ports on 127.0.0.1, all held open together while they are picked,
/// and never handed out twice by this process.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    use std::hash::BuildHasher;
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let span = u64::from(PORT_RANGE.end - PORT_RANGE.start);
    let mut listeners = Vec::new();
    let mut tries = 0;
    while listeners.len() < n {
        tries += 1;
        if tries > 100_000 {
            bail!("no {n} free ports left in {PORT_RANGE:?}");
        }
        let random = std::collections::hash_map::RandomState::new().hash_one(tries);
        let port = PORT_RANGE.start + (random % span) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        // Taken by someone else: try another.
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            handed_out.push(port);
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let mut all = free_ports(40).unwrap();
        all.extend(free_ports(40).unwrap());
        for &port in &all {
            assert!(PORT_RANGE.contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
        let mut unique = all.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), all.len(), "a port was handed out twice");
    }
}
