//! `client bench --system redis`: Redis INCR (get-id) and PING (ping) over one TCP connection
//! per caller, as redis-benchmark does, speaking just enough RESP for that.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One caller's connection.
pub struct Conn {
    addr: String,
    /// None after a call that did not end with a whole answer (cut short, broken): the next
    /// call connects afresh rather than read an answer meant for the one before.
    stream: Option<BufReader<TcpStream>>,
    incr: Vec<u8>,
    line: String,
}

/// Why a call failed, named like a gRPC code in the report.
#[derive(Debug, PartialEq, Eq)]
pub enum CallError {
    /// Redis answered `-ERR ...`.
    Refused,
    /// The connection broke, or the answer was not RESP.
    Io,
    Timeout,
}

impl CallError {
    pub fn name(&self) -> &'static str {
        match self {
            CallError::Refused => "REDIS_ERROR",
            CallError::Io => "IO",
            CallError::Timeout => "DEADLINE_EXCEEDED",
        }
    }
}

impl Conn {
    /// Connects to `addr` (host:port) within `deadline`; `key` is the counter INCR bumps.
    pub async fn connect(addr: &str, key: &str, deadline: Duration) -> anyhow::Result<Self> {
        let stream = tokio::time::timeout(deadline, open(addr))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {deadline:?}"))
            .and_then(|r| Ok(r?))
            .with_context(|| format!("connecting to redis at {addr}"))?;
        Ok(Self {
            addr: addr.to_string(),
            stream: Some(stream),
            incr: command(&["INCR", key]),
            line: String::new(),
        })
    }

    /// INCR: the counter's new value, which the benchmark takes as an id.
    pub async fn incr(&mut self, deadline: Duration) -> Result<u64, CallError> {
        let request = self.incr.clone();
        match self.call(&request, deadline).await? {
            Answer::Integer(n) => u64::try_from(n).map_err(|_| CallError::Io),
            _ => Err(CallError::Io),
        }
    }

    pub async fn ping(&mut self, deadline: Duration) -> Result<(), CallError> {
        match self.call(&command(&["PING"]), deadline).await? {
            Answer::Simple(s) if s == "PONG" => Ok(()),
            _ => Err(CallError::Io),
        }
    }

    async fn call(&mut self, request: &[u8], deadline: Duration) -> Result<Answer, CallError> {
        let exchange = async {
            // Taken for the call and put back only with a whole answer read, so a call that
            // is dropped half way leaves nothing behind for the next one.
            let mut stream = match self.stream.take() {
                Some(s) => s,
                None => open(&self.addr).await?,
            };
            stream.get_mut().write_all(request).await?;
            self.line.clear();
            stream.read_line(&mut self.line).await?;
            let answer = parse(&self.line);
            if answer.is_some() {
                self.stream = Some(stream);
            }
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(deadline, exchange).await {
            Ok(Ok(Some(Answer::Error(_)))) => Err(CallError::Refused),
            Ok(Ok(Some(answer))) => Ok(answer),
            Ok(Ok(None)) | Ok(Err(_)) => Err(CallError::Io),
            Err(_) => Err(CallError::Timeout),
        }
    }
}

async fn open(addr: &str) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// A one-line RESP answer: all INCR and PING return.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Simple(String),
    Error(String),
    Integer(i64),
}

/// A command as a RESP array of bulk strings.
fn command(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend(format!("${}\r\n{p}\r\n", p.len()).into_bytes());
    }
    out
}

fn parse(line: &str) -> Option<Answer> {
    let body = line.strip_suffix("\r\n")?;
    let (kind, rest) = body.split_at_checked(1)?;
    match kind {
        "+" => Some(Answer::Simple(rest.to_string())),
        "-" => Some(Answer::Error(rest.to_string())),
        ":" => rest.parse().ok().map(Answer::Integer),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays_and_one_line_answers_parse() {
        assert_eq!(
            command(&["INCR", "k1"]),
            b"*2\r\n$4\r\nINCR\r\n$2\r\nk1\r\n"
        );
        assert_eq!(parse(":42\r\n"), Some(Answer::Integer(42)));
        assert_eq!(parse("+PONG\r\n"), Some(Answer::Simple("PONG".into())));
        assert_eq!(
            parse("-ERR wrong type\r\n"),
            Some(Answer::Error("ERR wrong type".into()))
        );
        // Not an answer INCR or PING gives, or cut short.
        assert_eq!(parse("$3\r\n"), None);
        assert_eq!(parse(":42"), None);
        assert_eq!(parse(":x\r\n"), None);
        assert_eq!(parse(""), None);
    }

    /// A listener that answers like Redis, so the caller is tested over a real socket. With
    /// `broken`, INCR always answers 7, as a counter that repeats itself would.
    pub(crate) async fn fake_redis(broken: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let mut args = Vec::new();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if line.starts_with('*') || line.starts_with('$') {
                            continue;
                        }
                        args.push(line);
                        let answer = match args.as_slice() {
                            [cmd] if cmd == "PING" => "+PONG\r\n".to_string(),
                            [cmd, _] if cmd == "INCR" && broken => ":7\r\n".to_string(),
                            [cmd, key] if cmd == "INCR" && key.starts_with("bench") => {
                                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                format!(":{}\r\n", n + 1)
                            }
                            [cmd, _] if cmd == "INCR" => "-WRONGTYPE not a counter\r\n".into(),
                            _ => continue,
                        };
                        args.clear();
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn incr_ping_and_refusals_over_a_socket() {
        let addr = fake_redis(false).await;
        let t = Duration::from_secs(5);
        let mut a = Conn::connect(&addr, "bench", t).await.unwrap();
        let mut b = Conn::connect(&addr, "bench", t).await.unwrap();
        assert_eq!(a.ping(t).await, Ok(()));
        assert_eq!(a.incr(t).await, Ok(1));
        assert_eq!(b.incr(t).await, Ok(2));
        assert_eq!(a.incr(t).await, Ok(3));
        let mut wrong = Conn::connect(&addr, "other", t).await.unwrap();
        assert_eq!(wrong.incr(t).await, Err(CallError::Refused));
        assert!(Conn::connect("127.0.0.1:1", "bench", t).await.is_err());
    }

    /// A call given up on (the bench drops any call still running past its deadline) must
    /// not leave its answer on the connection for the next call to take as its own.
    #[tokio::test]
    async fn a_call_cut_short_leaves_no_answer_behind() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            // The first connection answers only once told to, and then as a stale INCR would.
            let (mut slow, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = gate.await;
                let _ = slow.write_all(b":41\r\n").await;
                let mut rest = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut slow, &mut rest).await;
            });
            // Any later one answers PING at once.
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                        .await
                        .unwrap_or(0)
                        > 0
                    {
                        let _ = s.write_all(b"+PONG\r\n").await;
                    }
                });
            }
        });
        let mut c = Conn::connect(&addr, "bench", Duration::from_secs(5))
            .await
            .unwrap();
        {
            let cut = c.incr(Duration::from_secs(5));
            tokio::pin!(cut);
            assert!(futures::poll!(cut.as_mut()).is_pending());
        }
        go.send(()).unwrap();
        assert_eq!(c.ping(Duration::from_secs(5)).await, Ok(()));
    }
}
