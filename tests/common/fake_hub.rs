//! A stand-in for the Hugging Face hub on 127.0.0.1, serving one model repository over plain
//! HTTP the way hf-hub asks for it: the revision's commit, the file tree, a HEAD per file
//! (ETag, commit, size) and the file itself. Bodies can be sent slowly so that a progress bar
//! has time to show.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

pub struct FakeHub {
    pub endpoint: String,
    /// How many file bodies were sent (a cached file is not fetched again).
    pub bodies_sent: Arc<AtomicUsize>,
}

/// Serve `files` as `repo_id` at revision `main`; each body goes out in `chunks` pieces with
/// `pause` between them.
pub fn serve(repo_id: &str, files: Vec<(String, Vec<u8>)>, chunks: usize, pause: Duration) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let bodies_sent = Arc::new(AtomicUsize::new(0));
    let files = Arc::new(files);
    let repo = repo_id.to_string();
    let sent = bodies_sent.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (files, repo, sent) = (files.clone(), repo.clone(), sent.clone());
            std::thread::spawn(move || {
                let _ = answer(stream, &repo, &files, chunks, pause, &sent);
            });
        }
    });
    FakeHub { endpoint, bodies_sent }
}

fn answer(
    mut stream: TcpStream,
    repo: &str,
    files: &[(String, Vec<u8>)],
    chunks: usize,
    pause: Duration,
    sent: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header.trim().is_empty() {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body)?;
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let file_prefix = format!("/{repo}/resolve/{COMMIT}/");
        if method == "GET" && path.starts_with(&format!("/api/models/{repo}/revision/")) {
            let json = format!(r#"{{"id":"{repo}","sha":"{COMMIT}"}}"#);
            respond(&mut stream, "200 OK", "application/json", json.as_bytes(), &[], 1, Duration::ZERO)?;
        } else if method == "GET" && path.starts_with(&format!("/api/models/{repo}/tree/")) {
            let entries: Vec<String> = files
                .iter()
                .enumerate()
                .map(|(i, (name, data))| {
                    format!(r#"{{"type":"file","oid":"oid{i}","size":{},"path":"{name}"}}"#, data.len())
                })
                .collect();
            let json = format!("[{}]", entries.join(","));
            respond(&mut stream, "200 OK", "application/json", json.as_bytes(), &[], 1, Duration::ZERO)?;
        } else if let Some((i, (_, data))) =
            path.strip_prefix(&file_prefix).and_then(|name| files.iter().enumerate().find(|(_, (n, _))| n == name))
        {
            let headers =
                [("ETag".to_string(), format!("\"etag{i}\"")), ("X-Repo-Commit".to_string(), COMMIT.to_string())];
            if method == "HEAD" {
                let head = [headers[0].clone(), headers[1].clone(), ("Content-Length".into(), data.len().to_string())];
                write_head(&mut stream, "200 OK", "application/octet-stream", &head)?;
            } else {
                sent.fetch_add(1, Ordering::SeqCst);
                respond(&mut stream, "200 OK", "application/octet-stream", data, &headers, chunks, pause)?;
            }
        } else {
            respond(
                &mut stream,
                "404 Not Found",
                "application/json",
                br#"{"error":"not found"}"#,
                &[],
                1,
                Duration::ZERO,
            )?;
        }
    }
}

fn write_head(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    headers: &[(String, String)],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.flush()
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    headers: &[(String, String)],
    chunks: usize,
    pause: Duration,
) -> std::io::Result<()> {
    let mut all = headers.to_vec();
    all.push(("Content-Length".into(), body.len().to_string()));
    write_head(stream, status, content_type, &all)?;
    let size = body.len().div_ceil(chunks.max(1)).max(1);
    for piece in body.chunks(size) {
        stream.write_all(piece)?;
        stream.flush()?;
        std::thread::sleep(pause);
    }
    Ok(())
}
