//! The admin subcommands: `member list|add|promote|remove` and `transfer-primary`, and where
//! the admin token comes from.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use sequencer_client::{data_dir_from_config, pb, Client};
use serde_json::json;

use crate::print_result;

/// The environment variable the admin token may come from (as the server reads it too).
pub const ADMIN_TOKEN_ENV: &str = "SEQUENCER_ADMIN_TOKEN";
/// The file in the config's data_dir where the one-command launcher keeps the admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// A secret from the command line, which Debug output (of the parsed flags) does not show.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Where the admin token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Flag,
    Env,
    File(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Flag => f.write_str("--admin-token"),
            TokenSource::Env => f.write_str(ADMIN_TOKEN_ENV),
            TokenSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The admin token, first found wins: `flag`, then `env` (SEQUENCER_ADMIN_TOKEN's value),
/// then `admin.token` in the data_dir of the config whose text `config` reads (only read if
/// it comes to that). An empty value counts as none; the file's is trimmed, as the server
/// trims it. A missing file is no token; an unreadable one is an error.
pub fn find_token(
    flag: Option<&str>,
    env: Option<&str>,
    config: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<Option<(String, TokenSource)>> {
    if let Some(token) = flag.filter(|t| !t.is_empty()) {
        return Ok(Some((token.to_string(), TokenSource::Flag)));
    }
    if let Some(token) = env.filter(|t| !t.is_empty()) {
        return Ok(Some((token.to_string(), TokenSource::Env)));
    }
    let path = token_file(&config()?)?;
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => Ok(Some((text.trim().to_string(), TokenSource::File(path)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the admin token {}", path.display())),
    }
}

/// `data_dir/admin.token` of the config text `config`.
fn token_file(config: &str) -> anyhow::Result<PathBuf> {
    Ok(data_dir_from_config(config)?.join(ADMIN_TOKEN_FILE))
}

/// SEQUENCER_ADMIN_TOKEN, if set.
pub fn token_from_env() -> anyhow::Result<Option<String>> {
    match std::env::var(ADMIN_TOKEN_ENV) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{ADMIN_TOKEN_ENV} is not valid UTF-8")
        }
    }
}

/// `client member ...`.
#[derive(Subcommand, Debug)]
pub enum MemberCmd {
    /// Voters and learners, with their addresses and how far each is behind the primary.
    List,
    /// Add a node: it catches up as a learner, then becomes a voter (unless --learner).
    /// Answers once that is done, which may take a while (the call waits up to 120 s).
    Add {
        /// The new node's id.
        id: u32,
        /// Where clients reach it.
        #[arg(long, value_name = "HOST:PORT")]
        addr: String,
        /// Where peers reach it.
        #[arg(long, value_name = "HOST:PORT")]
        peer_addr: String,
        /// Leave it a learner (a copy with no vote) instead of promoting it.
        #[arg(long)]
        learner: bool,
    },
    /// Promote a learner to voter.
    Promote { id: u32 },
    /// Remove a voter or a learner.
    Remove {
        id: u32,
        /// Remove it even if the voters left could not form a quorum with the members
        /// reachable now.
        #[arg(long)]
        force: bool,
    },
}

pub async fn member(client: &Client, cmd: &MemberCmd, json_out: bool) -> anyhow::Result<()> {
    let (done, listing) = match cmd {
        MemberCmd::List => (None, client.list_cluster_members().await?),
        MemberCmd::Add {
            id,
            addr,
            peer_addr,
            learner,
        } => {
            let r = client.add_member(*id, addr, peer_addr, *learner).await?;
            let listing = r.members.unwrap_or_default();
            let role = role_of(&listing, *id).unwrap_or("member");
            (Some(format!("node {id} added as a {role}")), listing)
        }
        MemberCmd::Promote { id } => {
            let r = client.promote_member(*id).await?;
            (
                Some(format!("node {id} promoted to voter")),
                r.members.unwrap_or_default(),
            )
        }
        MemberCmd::Remove { id, force } => {
            let r = client.remove_member(*id, *force).await?;
            (
                Some(format!("node {id} removed")),
                r.members.unwrap_or_default(),
            )
        }
    };
    if json_out {
        println!("{}", listing_json(&listing));
        return Ok(());
    }
    if let Some(done) = done {
        println!("{done}");
    }
    print!("{}", listing_table(&listing));
    Ok(())
}

fn role_of(listing: &pb::AdminListResponse, id: u32) -> Option<&str> {
    listing
        .members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.role.as_str())
}

pub fn listing_json(l: &pb::AdminListResponse) -> serde_json::Value {
    let members: Vec<_> = l
        .members
        .iter()
        .map(|m| {
            json!({"id": m.id, "addr": m.addr, "peer_addr": m.peer_addr, "role": m.role,
                   "primary": m.primary, "matched_index": m.matched_index, "lag": m.lag})
        })
        .collect();
    json!({"primary": l.primary, "membership_index": l.membership_index,
           "changing": l.changing, "members": members})
}

/// The listing for people: a line on the membership, then one row per member.
pub fn listing_table(l: &pb::AdminListResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let change = if l.changing {
        "a change is in progress (joint consensus)"
    } else {
        "no change in progress"
    };
    let _ = writeln!(
        out,
        "membership at log index {}, {change}",
        l.membership_index
    );
    let _ = writeln!(
        out,
        "{:<4} {:<22} {:<22} {:<8} {:<7} {:>10} {:>8}",
        "ID", "CLIENT", "PEER", "ROLE", "PRIMARY", "MATCHED", "LAG"
    );
    for m in &l.members {
        let _ = writeln!(
            out,
            "{:<4} {:<22} {:<22} {:<8} {:<7} {:>10} {:>8}",
            m.id,
            m.addr,
            m.peer_addr,
            m.role,
            if m.primary { "*" } else { "" },
            m.matched_index,
            m.lag
        );
    }
    out
}

pub async fn transfer_primary(
    client: &Client,
    to: Option<u32>,
    json_out: bool,
) -> anyhow::Result<()> {
    let r = client.transfer_primary(to).await?;
    print_result(
        json_out,
        json!({"from": r.from, "to": r.to, "took_ms": r.took_ms}),
        format!(
            "primary moved from node {} to node {} in {} ms",
            r.from, r.to, r.took_ms
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn no_config() -> anyhow::Result<String> {
        panic!("the config was read although an earlier source had a token")
    }

    #[test]
    fn the_flag_wins_then_the_environment() {
        assert_eq!(
            find_token(Some("from-flag"), Some("from-env"), no_config).unwrap(),
            Some(("from-flag".to_string(), TokenSource::Flag))
        );
        assert_eq!(
            find_token(None, Some("from-env"), no_config).unwrap(),
            Some(("from-env".to_string(), TokenSource::Env))
        );
        // An empty one counts as none.
        assert_eq!(
            find_token(Some(""), Some("from-env"), no_config).unwrap(),
            Some(("from-env".to_string(), TokenSource::Env))
        );
    }

    #[test]
    fn then_the_file_in_the_configs_data_dir_and_a_missing_one_is_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("somewhere");
        std::fs::create_dir_all(&data).unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, json!({ "data_dir": data }).to_string()).unwrap();
        let read = || Ok(std::fs::read_to_string(&config)?);

        assert_eq!(find_token(None, None, read).unwrap(), None);
        assert_eq!(find_token(None, Some(""), read).unwrap(), None);

        std::fs::write(data.join(ADMIN_TOKEN_FILE), "from-file\n").unwrap();
        assert_eq!(
            find_token(None, None, read).unwrap(),
            Some((
                "from-file".to_string(),
                TokenSource::File(data.join(ADMIN_TOKEN_FILE))
            ))
        );
        // The flag and the environment still come first.
        assert_eq!(
            find_token(None, Some("from-env"), read).unwrap().unwrap().1,
            TokenSource::Env
        );
        assert_eq!(
            find_token(Some("f"), Some("e"), read).unwrap().unwrap().1,
            TokenSource::Flag
        );
        // A file with only whitespace holds no token.
        std::fs::write(data.join(ADMIN_TOKEN_FILE), " \n").unwrap();
        assert_eq!(find_token(None, None, read).unwrap(), None);
    }

    #[test]
    fn the_data_dir_defaults_to_data_and_a_relative_one_is_taken_as_written() {
        assert_eq!(token_file("{}").unwrap(), Path::new("data/admin.token"));
        assert_eq!(
            token_file(r#"{"data_dir": "var/seq"}"#).unwrap(),
            Path::new("var/seq/admin.token")
        );
        assert!(token_file("not json").is_err());
    }

    #[test]
    fn an_unreadable_token_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails, and not as NotFound.
        std::fs::create_dir_all(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        let config = json!({ "data_dir": dir.path() }).to_string();
        let e = find_token(None, None, || Ok(config)).unwrap_err();
        assert!(format!("{e:#}").contains(ADMIN_TOKEN_FILE), "{e:#}");
    }

    #[test]
    fn the_flags_secret_is_not_printed() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(s.0, "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn the_table_marks_the_primary_and_says_whether_a_change_is_under_way() {
        let l = pb::AdminListResponse {
            primary: 2,
            members: vec![
                pb::ClusterMember {
                    id: 1,
                    addr: "127.0.0.1:1".into(),
                    peer_addr: "127.0.0.1:2".into(),
                    role: "voter".into(),
                    primary: false,
                    matched_index: 9,
                    lag: 1,
                },
                pb::ClusterMember {
                    id: 2,
                    addr: "127.0.0.1:3".into(),
                    peer_addr: "127.0.0.1:4".into(),
                    role: "learner".into(),
                    primary: true,
                    matched_index: 10,
                    lag: 0,
                },
            ],
            membership_index: 7,
            changing: true,
        };
        let table = listing_table(&l);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("log index 7"), "{table}");
        assert!(lines[0].contains("change is in progress"), "{table}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols,
            ["ID", "CLIENT", "PEER", "ROLE", "PRIMARY", "MATCHED", "LAG"]
        );
        let row: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            row,
            ["2", "127.0.0.1:3", "127.0.0.1:4", "learner", "*", "10", "0"]
        );
        assert_eq!(
            lines[2].split_whitespace().count(),
            6,
            "no * on a non-primary"
        );
        let j = listing_json(&l);
        assert_eq!(j["members"][1]["primary"], true);
        assert_eq!(j["changing"], true);
        assert_eq!(j["membership_index"], 7);
    }
}
