//! A pub/sub test server: `ws://127.0.0.1:PORT/pubsub/{topic}` subscribes the connection to
//! `topic`, and every message it sends is fanned out to every *other* connection on the topic,
//! like ringgate's route. A connection is registered before its 101 is written, as ringgate does.
//! Optionally drops every `n`th message of each publishing connection (not delivered to anyone).
//!
//! One std thread per connection: it alternates between writing what was fanned out to it and
//! reading with a short timeout (tungstenite keeps a partial frame across timeouts).

// The handshake callback's error type is tungstenite's (an HTTP response), large by its design.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tungstenite::Message;
use tungstenite::handshake::server::{Request, Response};

type Topics = Arc<Mutex<HashMap<String, Vec<(u64, Sender<Vec<u8>>)>>>>;

/// A pub/sub server on 127.0.0.1 that runs until dropped.
pub struct PubSubServer {
    /// `ws://127.0.0.1:PORT/pubsub`.
    pub url: String,
    /// Deliveries dropped (a dropped message counts once per other connection on its topic).
    pub dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl PubSubServer {
    /// Starts a server; with `drop_every: Some(n)` each connection's `n`th, `2n`th, ... message
    /// is not delivered.
    pub fn start(drop_every: Option<u64>) -> PubSubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let url = format!("ws://{}/pubsub", listener.local_addr().expect("local addr"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let topics: Topics = Arc::default();
        let acceptor = {
            let (stop, dropped) = (Arc::clone(&stop), Arc::clone(&dropped));
            thread::spawn(move || {
                let mut next_id = 0;
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (topics, dropped, stop) =
                                (Arc::clone(&topics), Arc::clone(&dropped), Arc::clone(&stop));
                            next_id += 1;
                            let id = next_id;
                            thread::spawn(move || serve(stream, id, &topics, drop_every, &dropped, &stop));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        PubSubServer { url, dropped, stop, acceptor: Some(acceptor) }
    }
}

impl Drop for PubSubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    id: u64,
    topics: &Topics,
    drop_every: Option<u64>,
    dropped: &AtomicU64,
    stop: &AtomicBool,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let mut registered: Option<(String, Receiver<Vec<u8>>)> = None;
    let callback = |request: &Request, response: Response| {
        let topic = request.uri().path().strip_prefix("/pubsub/").unwrap_or("").to_string();
        let (tx, rx) = mpsc::channel();
        topics.lock().unwrap_or_else(|e| e.into_inner()).entry(topic.clone()).or_default().push((id, tx));
        registered = Some((topic, rx));
        Ok(response)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else { return };
    let Some((topic, inbox)) = registered else { return };
    let _ = ws.get_ref().set_read_timeout(Some(Duration::from_millis(1)));
    let mut count = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut failed = false;
        while let Ok(data) = inbox.try_recv() {
            if ws.send(Message::Binary(data.into())).is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            break;
        }
        let data = match ws.read() {
            Ok(Message::Binary(data)) => data.to_vec(),
            Ok(Message::Text(text)) => text.as_bytes().to_vec(),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                continue;
            }
            Err(_) => break,
        };
        count += 1;
        let map = topics.lock().unwrap_or_else(|e| e.into_inner());
        let others = map.get(&topic).into_iter().flatten().filter(|(other, _)| *other != id);
        if drop_every.is_some_and(|n| count % n == 0) {
            dropped.fetch_add(others.count() as u64, Ordering::Relaxed);
            continue;
        }
        for (_, tx) in others {
            let _ = tx.send(data.clone());
        }
    }
    let mut map = topics.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(list) = map.get_mut(&topic) {
        list.retain(|(other, _)| *other != id);
    }
}
