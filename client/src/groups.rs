//! The group-messaging subcommands, and the interactive chat.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use sequencer_client::pb::delivery::Kind;
use sequencer_client::pb::{Delivery, Member};
use sequencer_client::{Client, ClientError, Identity};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::Code;

use crate::print_result;

/// Who is calling: from flags, or the environment `register` suggests.
#[derive(Args, Debug)]
pub struct IdentityArgs {
    #[arg(long, env = "SEQUENCER_CLIENT_ID")]
    client_id: u64,
    #[arg(long, env = "SEQUENCER_TOKEN", hide_env_values = true)]
    token: String,
}

impl IdentityArgs {
    pub fn identity(&self) -> Identity {
        Identity {
            client_id: self.client_id,
            token: self.token.clone(),
        }
    }
}

pub async fn register(client: &Client, name: &str, json_out: bool) -> anyhow::Result<()> {
    let r = client.register(name).await?;
    if json_out {
        println!(
            "{}",
            json!({"client_id": r.client_id, "token": r.token,
                   "heartbeat_interval_ms": r.heartbeat_interval_ms, "failure_timeout_ms": r.failure_timeout_ms})
        );
    } else {
        println!(
            "export SEQUENCER_CLIENT_ID={} SEQUENCER_TOKEN={}",
            r.client_id, r.token
        );
        eprintln!(
            "registered as client {}; send a heartbeat at least every {} ms (listen and chat do)",
            r.client_id, r.heartbeat_interval_ms
        );
    }
    Ok(())
}

pub async fn join(
    client: &Client,
    me: &Identity,
    group: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    let r = client.join(me, group).await?;
    let members: Vec<_> = r.members.iter().map(member_json).collect();
    let names: Vec<&str> = r.members.iter().map(|m| m.name.as_str()).collect();
    print_result(
        json_out,
        json!({"next_seq": r.next_seq, "next_sender_seq": r.next_sender_seq, "members": members}),
        format!(
            "joined {group}: next_seq {}, members {}",
            r.next_seq,
            names.join(", ")
        ),
    );
    Ok(())
}

pub async fn send(
    client: &Client,
    me: &Identity,
    group: &str,
    seq: Option<u64>,
    text: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    let seq = match seq {
        Some(s) => s,
        // Joining again is harmless for a member and tells the next sender_seq.
        None => client.join(me, group).await?.next_sender_seq,
    };
    let r = client
        .send(me, group, seq, text.as_bytes().to_vec())
        .await?;
    print_result(
        json_out,
        json!({"group_seq": r.group_seq, "sender_seq": seq, "duplicate": r.duplicate}),
        r.group_seq,
    );
    Ok(())
}

pub async fn list_groups(client: &Client, json_out: bool) -> anyhow::Result<()> {
    for g in client.list_groups().await?.groups {
        print_result(
            json_out,
            json!({"name": g.name, "members": g.members, "next_seq": g.next_seq}),
            format!(
                "{:<24} {:>5} members  next_seq {}",
                g.name, g.members, g.next_seq
            ),
        );
    }
    Ok(())
}

pub async fn list_members(client: &Client, group: &str, json_out: bool) -> anyhow::Result<()> {
    for m in client.list_members(group).await?.members {
        print_result(
            json_out,
            member_json(&m),
            format!(
                "{:<8} {:<24} joined at {}",
                m.client_id, m.name, m.joined_at_seq
            ),
        );
    }
    Ok(())
}

/// A member as `join` and `members` print it under --json.
fn member_json(m: &Member) -> serde_json::Value {
    json!({"client_id": m.client_id, "name": m.name, "joined_at_seq": m.joined_at_seq})
}

/// One delivery as a chat line: `[seq] name: text`, or `[seq] * name joined`.
pub fn format_delivery(d: &Delivery) -> String {
    let event = match Kind::try_from(d.kind) {
        Ok(Kind::Message) => {
            return format!(
                "[{}] {}: {}",
                d.group_seq,
                d.sender_name,
                String::from_utf8_lossy(&d.payload)
            )
        }
        Ok(Kind::Joined) => "joined",
        Ok(Kind::Left) => "left",
        Ok(Kind::Failed) => "failed (no heartbeat)",
        Err(_) => "did something new",
    };
    format!("[{}] * {} {event}", d.group_seq, d.sender_name)
}

fn print_delivery(d: &Delivery, json_out: bool) {
    let line = if json_out {
        let kind = Kind::try_from(d.kind)
            .map(|k| k.as_str_name())
            .unwrap_or("UNKNOWN");
        json!({"group_seq": d.group_seq, "sender_id": d.sender_id, "sender_name": d.sender_name,
               "sender_seq": d.sender_seq, "kind": kind,
               "payload": String::from_utf8_lossy(&d.payload)})
        .to_string()
    } else {
        format_delivery(d)
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints deliveries from `from_seq` on, resubscribing where it stopped if the stream breaks,
/// until the server ends the stream after this client's last leave or removal. Returns that line.
async fn follow(
    client: &Client,
    me: &Identity,
    group: &str,
    mut from_seq: u64,
    json_out: bool,
) -> Result<String, ClientError> {
    // The last delivery about this client's own membership, if it was a leave or removal.
    let mut exit = None;
    loop {
        let mut stream = client.subscribe(me, group, from_seq).await?;
        loop {
            match stream.message().await {
                Ok(Some(d)) => {
                    print_delivery(&d, json_out);
                    from_seq = d.group_seq + 1;
                    if d.sender_id == me.client_id && d.kind != Kind::Message as i32 {
                        exit = (d.kind != Kind::Joined as i32).then(|| format_delivery(&d));
                    }
                }
                Ok(None) => match exit.take() {
                    Some(line) => return Ok(line),
                    None => break,
                },
                // Too slow, or the server went away: pick up where we stopped.
                Err(s)
                    if matches!(
                        s.code(),
                        Code::ResourceExhausted
                            | Code::Unavailable
                            | Code::Unknown
                            | Code::Cancelled
                    ) =>
                {
                    break
                }
                Err(s) => {
                    return Err(ClientError::Rejected {
                        server: "subscription".into(),
                        status: s,
                    })
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn listen(
    client: &Client,
    me: &Identity,
    group: &str,
    from_seq: u64,
    json_out: bool,
) -> anyhow::Result<()> {
    let _alive = client.keep_alive(me);
    follow(client, me, group, from_seq, json_out).await?;
    Ok(())
}

/// Registers, joins, heartbeats, sends each stdin line, prints every delivery; on EOF or
/// Ctrl-C leaves the group and unregisters.
pub async fn chat(client: Client, name: &str, group: &str) -> anyhow::Result<()> {
    let client = Arc::new(client);
    let registered = client.register(name).await?;
    let me = Identity::from(&registered);
    let alive = client.keep_alive(&me);
    let joined = client.join(&me, group).await?;
    let own_join = joined
        .members
        .iter()
        .find(|m| m.client_id == me.client_id)
        .map(|m| m.joined_at_seq)
        .unwrap_or(joined.next_seq);
    eprintln!("chat: {name} in {group}; type a line to send it, Ctrl-D or Ctrl-C to leave");
    let printer = {
        let (client, me, group) = (client.clone(), me.clone(), group.to_string());
        tokio::spawn(async move { follow(&client, &me, &group, own_join, false).await })
    };

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut seq = joined.next_sender_seq;
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(text) if text.trim().is_empty() => continue,
                Some(text) => {
                    client.send(&me, group, seq, text.into_bytes()).await?;
                    seq += 1;
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.leave(&me, group).await?;
    // Our LEFT delivery ends the printer; do not wait forever if the stream is down.
    let _ = tokio::time::timeout(Duration::from_secs(5), printer).await;
    // Stopped first: a heartbeat after the unregister would only be refused.
    alive.stop().await;
    client.unregister(&me).await?;
    Ok(())
}
