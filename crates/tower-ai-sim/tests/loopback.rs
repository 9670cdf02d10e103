//! The simulator over real HTTP on 127.0.0.1, on the real clock (a paused
//! clock would auto-advance while waiting on sockets). Waits are kept short.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tower_ai_sim::{digest, Latency, ModelSpec, Scenario, SimServer, Simulator, StreamFault};

async fn post(server: &SimServer, path: &str, body: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body).await.unwrap();
    tcp
}

/// Read until the end of the response head; returns (status, head text, bytes after it).
async fn read_head(tcp: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = timeout(Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .expect("head within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed before the head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..pos].to_vec()).unwrap();
            let status = head[9..12].parse().unwrap();
            return (status, head.to_ascii_lowercase(), buf[pos + 4..].to_vec());
        }
    }
}

/// Decode an HTTP/1.1 chunked body (complete).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn token_sim(tokens: u32, interval_ms: u64) -> Simulator {
    Simulator::new(
        Scenario::builder()
            .default_model(ModelSpec::new("*").completion_tokens(tokens))
            .token_interval(Latency::fixed(Duration::from_millis(interval_ms)))
            .build()
            .unwrap(),
    )
}

#[tokio::test]
async fn sse_arrives_chunk_by_chunk() {
    // Tokens 200 ms apart: the reads below see them apart unless this task is held off the
    // CPU for more than two gaps at once (the real clock, on a shared machine).
    let sim = token_sim(4, 200);
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let body = br#"{"model":"claude","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let mut tcp = post(&server, "/v1/messages", body).await;
    let (status, head, mut raw) = read_head(&mut tcp).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/event-stream"));
    assert!(head.contains("transfer-encoding: chunked"));

    // Record when each token event arrives.
    let t0 = Instant::now();
    let mut token_times = Vec::new();
    let mut seen = 0;
    let mut chunk = [0u8; 4096];
    loop {
        let n = timeout(Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        let count = String::from_utf8_lossy(&raw)
            .matches("event: content_block_delta")
            .count();
        for _ in seen..count {
            token_times.push(t0.elapsed());
        }
        seen = count;
    }
    let text = String::from_utf8(dechunk(&raw)).unwrap();
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    assert_eq!(token_times.len(), 4);
    let distinct = {
        let mut t = token_times.clone();
        t.dedup();
        t.len()
    };
    println!("token arrival times: {token_times:?}");
    assert!(
        distinct >= 2,
        "tokens arrived in separate reads: {token_times:?}"
    );
    // 200 ms apart on the server: the last arrives after the first, however late the
    // first was read (a lower bound on the span would hold only on an idle machine).
    assert!(token_times[3] > token_times[0], "{token_times:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn stall_holds_the_connection_open() {
    let sim = Simulator::new(
        Scenario::builder()
            .stream_fault(StreamFault::StallAfterTokens {
                tokens: 1,
                probability: 1.0,
            })
            // Longer than any delay of this test, so that nothing can follow the first
            // token while the test looks, however loaded the machine.
            .stall_duration(Duration::from_secs(3600))
            .build()
            .unwrap(),
    );
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let mut tcp = post(&server, "/v1/chat/completions", body).await;
    let (status, _, mut raw) = read_head(&mut tcp).await;
    assert_eq!(status, 200);
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains(r#""content":"Hello""#) {
        let n = timeout(Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the first token");
        raw.extend_from_slice(&chunk[..n]);
    }
    // Now the stall: nothing arrives in a while (it lasts an hour), and the connection is
    // not closed.
    let read = timeout(Duration::from_millis(300), tcp.read(&mut chunk)).await;
    assert!(
        read.is_err(),
        "a read during the stall must time out, got {read:?}"
    );
    match tcp.try_read(&mut chunk) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("connection should still be open and silent, got {other:?}"),
    }
    assert!(!String::from_utf8_lossy(&raw).contains("[DONE]"));

    // Shutting down cuts the stalled response after the grace period:
    // the client sees the connection end without the final chunk.
    server.shutdown_with_grace(Duration::from_millis(50)).await;
    let mut rest = Vec::new();
    let _ = timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .expect("closed after shutdown");
    assert!(!String::from_utf8_lossy(&rest).contains("0\r\n\r\n"));
}

#[tokio::test]
async fn body_arrives_byte_for_byte_and_errors_keep_headers() {
    let sim = Simulator::new(Scenario::builder().rpm_limit(1).build().unwrap());
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let body =
        "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"héllo \\u00e9 ✓\"}]}";
    for expected in [200, 429] {
        let mut tcp = post(&server, "/v1/chat/completions", body.as_bytes()).await;
        let (status, head, _) = read_head(&mut tcp).await;
        assert_eq!(status, expected);
        assert!(head.contains("x-ratelimit-limit-requests: 1"));
        if expected == 429 {
            assert!(head.contains("retry-after: "));
            assert!(head.contains("x-ratelimit-remaining-requests: 0"));
        }
    }
    let calls = sim.calls();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(call.body_digest, digest(body.as_bytes()));
        assert_eq!(call.body_len, body.len());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_responses_in_flight() {
    let sim = Simulator::new(
        Scenario::builder()
            .latency(Latency::fixed(Duration::from_millis(200)))
            .build()
            .unwrap(),
    );
    let server = sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.addr();
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#;
    let mut tcp = post(&server, "/v1/chat/completions", body).await;
    // Make sure the request has reached the simulator before shutting down.
    while sim.stats().total == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let shutdown = tokio::spawn(server.shutdown());
    let (status, _, _) = read_head(&mut tcp).await;
    assert_eq!(status, 200);
    timeout(Duration::from_secs(5), shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}
