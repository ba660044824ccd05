//! What a `?since=EPOCH:OFFSET` subscriber reads (the history tests, in process and in Redis):
//! the recovery message every such subscriber gets first, and text messages in the positions
//! envelope (`--positions`), read as JSON with `serde_json`, not with ringgate's own code.

use std::net::SocketAddr;

use super::wire::{self, Client, TEXT};

/// A position: a topic's epoch (16 hex digits, as the server prints it) and an offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

impl Position {
    /// The `?since=` value that asks for what came after this position.
    pub fn query(&self) -> String {
        format!("{}:{}", self.epoch, self.offset)
    }
}

/// The recovery message every `?since=` subscriber gets first.
#[derive(Debug)]
pub struct RecoveryMessage {
    pub recovered: bool,
    pub reason: String,
    pub at: Position,
    pub replayed: u64,
}

/// A text frame's payload as JSON.
pub fn json(frame: &wire::Frame) -> serde_json::Value {
    assert_eq!(frame.opcode, TEXT, "a text frame: {}", wire::summary(frame));
    serde_json::from_slice(&frame.payload).unwrap_or_else(|e| panic!("JSON ({e}): {}", wire::summary(frame)))
}

/// Reads the recovery message, which has exactly its six documented fields.
pub fn read_recovery(client: &mut Client) -> RecoveryMessage {
    let value = json(&client.read_frame());
    assert_eq!(value["ringgate"], "recovery", "{value}");
    let fields: Vec<&str> = value.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(fields.len(), 6, "{value}");
    RecoveryMessage {
        recovered: value["recovered"].as_bool().expect("recovered"),
        reason: value["reason"].as_str().expect("reason").to_owned(),
        at: Position {
            epoch: value["epoch"].as_str().expect("epoch").to_owned(),
            offset: value["offset"].as_u64().expect("offset"),
        },
        replayed: value["replayed"].as_u64().expect("replayed"),
    }
}

/// A text message in the positions envelope: its position and its original text.
pub fn read_text(client: &mut Client) -> (Position, String) {
    let value = json(&client.read_frame());
    let position = Position {
        epoch: value["epoch"].as_str().expect("epoch").to_owned(),
        offset: value["offset"].as_u64().expect("offset"),
    };
    (position, value["data"].as_str().expect("data").to_owned())
}

/// Subscribes to `topic` with `?since=` and reads the recovery message.
pub fn subscribe_since(addr: SocketAddr, topic: &str, since: &Position) -> (Client, RecoveryMessage) {
    let mut client = Client::connect(addr, &format!("/pubsub/{topic}?since={}", since.query()));
    let recovery = read_recovery(&mut client);
    (client, recovery)
}

/// A position no topic has: asking for it is answered `epoch_changed`.
pub fn nowhere() -> Position {
    Position { epoch: "0".into(), offset: 0 }
}
