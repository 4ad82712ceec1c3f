//! The browser wire protocol (`docs/protocol.md`): JSON text frames keyed by
//! `"command"`. v1 is the original Django Channels app's protocol, kept
//! byte-compatible; v2 adds a welcome, sequence numbers, a roster snapshot,
//! coalesced delay updates and error frames.
//!
//! Parsing borrows from the frame, so the ping path does not allocate.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::DelayStats;

/// Longest accepted name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Largest accepted delay sample, in milliseconds.
pub const MAX_DELAY_MS: f64 = 60_000.0;
/// Most client ids one `watch` may name: a page's visible rows, with room
/// to spare (200 ids fit a 4 KiB frame).
pub const MAX_WATCH_IDS: usize = 200;
/// Longest client id a `watch` may name, in bytes.
pub const MAX_WATCH_ID_BYTES: usize = 64;
/// Most rows one `view` may ask for (docs/protocol.md, "Public room: the
/// view"): a tall screen's worth twice over.
pub const MAX_VIEW_LIMIT: u32 = 200;
/// Rows of the default view, the one a page gets before (or without)
/// sending `view`.
pub const DEFAULT_VIEW_LIMIT: u32 = 50;
/// Longest `filter` of a view, in characters (a name is at most 64).
pub const MAX_FILTER_CHARS: usize = 64;

/// The order of a view's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sort {
    /// By lower-cased name, then id.
    #[default]
    Name,
    /// By latest delay, then id; clients without a sample last.
    Delay,
}

/// Ascending or descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Smallest first.
    #[default]
    Asc,
    /// Largest first.
    Desc,
}

/// The part of the public roster one page sees: a window of the sorted,
/// filtered list (docs/protocol.md, "Public room: the view").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ViewSpec {
    /// The order of the rows.
    pub sort: Sort,
    /// Ascending or descending.
    pub order: Order,
    /// Only names containing it, ignoring case; empty: everyone. Kept
    /// lower-cased.
    pub filter: String,
    /// The first row of the window.
    pub offset: u64,
    /// The most rows in the window (at most [`MAX_VIEW_LIMIT`]).
    pub limit: u32,
}

impl Default for ViewSpec {
    /// The default view: the first [`DEFAULT_VIEW_LIMIT`] rows by name.
    fn default() -> Self {
        Self {
            sort: Sort::Name,
            order: Order::Asc,
            filter: String::new(),
            offset: 0,
            limit: DEFAULT_VIEW_LIMIT,
        }
    }
}

/// Parses a view's `sort` (`name`, `delay`); `None` is the default.
///
/// # Errors
/// Anything else, with the reason.
pub fn parse_sort(v: Option<&str>) -> Result<Sort, &'static str> {
    match v {
        None | Some("name") => Ok(Sort::Name),
        Some("delay") => Ok(Sort::Delay),
        Some(_) => Err("sort must be \"name\" or \"delay\""),
    }
}

/// Parses a view's `order` (`asc`, `desc`); `None` is the default.
///
/// # Errors
/// Anything else, with the reason.
pub fn parse_order(v: Option<&str>) -> Result<Order, &'static str> {
    match v {
        None | Some("asc") => Ok(Order::Asc),
        Some("desc") => Ok(Order::Desc),
        Some(_) => Err("order must be \"asc\" or \"desc\""),
    }
}

/// Checks a view's `filter` (at most [`MAX_FILTER_CHARS`] characters) and
/// returns it lower-cased, as names are compared.
///
/// # Errors
/// Too long, with the reason.
pub fn parse_filter(v: Option<&str>) -> Result<String, &'static str> {
    let f = v.unwrap_or("");
    if f.chars().count() > MAX_FILTER_CHARS {
        return Err("filter is longer than 64 characters");
    }
    Ok(f.to_lowercase())
}

/// Which page a connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Page {
    /// Sees only its own delay; never in the roster.
    Private,
    /// In the roster; sees everyone.
    Public,
}

impl Page {
    /// The page's name as in URLs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Page::Private => "private",
            Page::Public => "public",
        }
    }
}

/// The protocol version a connection speaks (`?v=2` selects v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The original app's protocol.
    V1,
    /// Our extension.
    V2,
}

impl Version {
    /// The version as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "1",
            Version::V2 => "2",
        }
    }
}

/// The codes of error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, no string `command`, a binary frame, or a
    /// field of the wrong type.
    BadJson,
    /// A `command` this endpoint does not know.
    UnknownCommand,
    /// `delay_time` missing or not a finite number in 0..=60000.
    BadDelay,
    /// `name` missing, empty after trimming, too long, or with control
    /// characters.
    BadName,
    /// `channel_names` of a `watch` neither null nor an array of at most
    /// [`MAX_WATCH_IDS`] strings of at most [`MAX_WATCH_ID_BYTES`] bytes.
    BadWatch,
    /// A `view` field of the wrong type or out of bounds.
    BadView,
    /// A `delay_time` that matches no unused pong of this connection, or
    /// claims more time than passed since that pong's ping arrived.
    BadSample,
    /// A rename over the connection's rename budget
    /// (`--max-renames-per-minute`); the name is unchanged.
    TooManyRenames,
    /// The gateway's buffer of samples not yet stored is at its bound: the
    /// `delay_time` was not recorded (docs/protocol.md).
    Busy,
    /// A `device` command refused: on v1, a malformed secret, a second one,
    /// or after the connection's first recorded sample (docs/protocol.md,
    /// "Your history").
    BadDevice,
}

impl ErrorCode {
    /// The code as sent on the wire and used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::BadDelay => "bad_delay",
            ErrorCode::BadName => "bad_name",
            ErrorCode::BadWatch => "bad_watch",
            ErrorCode::BadView => "bad_view",
            ErrorCode::BadSample => "bad_sample",
            ErrorCode::TooManyRenames => "too_many_renames",
            ErrorCode::Busy => "busy",
            ErrorCode::BadDevice => "bad_device",
        }
    }
}

/// A rejected client frame: the error frame's code and detail.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {detail}", code.as_str())]
pub struct ProtocolError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub detail: Cow<'static, str>,
}

impl ProtocolError {
    fn new(code: ErrorCode, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }

    /// The error frame for this error.
    pub fn to_frame(&self) -> String {
        serde_json::to_string(&ServerMessage::Error {
            code: self.code,
            detail: self.detail.to_string(),
        })
        .expect("error frames serialize")
    }
}

/// A valid command from a browser.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientCommand {
    /// Answer at once with a pong.
    Ping {
        /// Echoed in the pong when present.
        seq: Option<u64>,
    },
    /// The client's measured delay.
    DelayTime {
        /// Milliseconds, finite, within 0..=60000.
        delay_ms: f64,
        /// The ping this sample measured, when the client says.
        seq: Option<u64>,
    },
    /// Rename this client.
    ChangeName {
        /// Trimmed, 1..=64 characters, no control characters.
        name: String,
    },
    /// v2 public, superseded by `view`: accepted and ignored once valid
    /// (docs/protocol.md).
    Watch {
        /// The watched client ids, without repeats.
        channel_names: Option<Vec<String>>,
    },
    /// v2 public: the part of the roster this page sees from now on.
    View(ViewSpec),
    /// v2: the browser identity this connection belongs to
    /// (docs/protocol.md, "Your history").
    Device {
        /// The browser's secret, well-formed
        /// ([`crate::ids::valid_device_secret`]).
        secret: String,
    },
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(borrow)]
    command: Cow<'a, str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    delay_time: Option<serde_json::Value>,
    #[serde(default, borrow)]
    name: Option<NameField<'a>>,
    #[serde(default)]
    channel_names: Option<serde_json::Value>,
    #[serde(default)]
    sort: Option<serde_json::Value>,
    #[serde(default)]
    order: Option<serde_json::Value>,
    #[serde(default)]
    filter: Option<serde_json::Value>,
    #[serde(default)]
    offset: Option<serde_json::Value>,
    #[serde(default)]
    limit: Option<serde_json::Value>,
    #[serde(default)]
    secret: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NameField<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Other(#[allow(dead_code)] serde::de::IgnoredAny),
}

/// Parses and validates one text frame from a browser.
///
/// # Errors
/// A [`ProtocolError`] whose code says what is wrong; the connection stays
/// open and the caller sends [`ProtocolError::to_frame`].
pub fn parse_client(text: &str) -> Result<ClientCommand, ProtocolError> {
    let raw: RawCommand<'_> = serde_json::from_str(text).map_err(|e| {
        let detail = if e.is_data() && !text.trim_start().starts_with('{') {
            "expected a JSON object".to_owned()
        } else {
            e.to_string()
        };
        ProtocolError::new(ErrorCode::BadJson, detail)
    })?;
    match raw.command.as_ref() {
        "ping" => Ok(ClientCommand::Ping { seq: raw.seq }),
        "delay_time" => {
            let delay_ms = validate_delay(raw.delay_time.as_ref())?;
            Ok(ClientCommand::DelayTime {
                delay_ms,
                seq: raw.seq,
            })
        }
        "change_name" => {
            let name = match raw.name {
                Some(NameField::Text(s)) => validate_name(&s)?,
                Some(NameField::Other(_)) => {
                    return Err(ProtocolError::new(
                        ErrorCode::BadName,
                        "name must be a string",
                    ));
                }
                None => return Err(ProtocolError::new(ErrorCode::BadName, "name is missing")),
            };
            Ok(ClientCommand::ChangeName { name })
        }
        "watch" => Ok(ClientCommand::Watch {
            channel_names: validate_watch(raw.channel_names)?,
        }),
        "view" => Ok(ClientCommand::View(validate_view(&raw)?)),
        "device" => Ok(ClientCommand::Device {
            secret: validate_device(raw.secret)?,
        }),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownCommand,
            format!("unknown command {:?}", truncate(other, 40)),
        )),
    }
}

fn truncate(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn validate_watch(v: Option<serde_json::Value>) -> Result<Option<Vec<String>>, ProtocolError> {
    let bad = |detail: &'static str| Err(ProtocolError::new(ErrorCode::BadWatch, detail));
    let items = match v {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(items)) => items,
        Some(_) => return bad("channel_names must be an array of client ids, or null"),
    };
    if items.len() > MAX_WATCH_IDS {
        return bad("channel_names may hold at most 200 client ids");
    }
    let mut ids: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            serde_json::Value::String(id) if id.len() <= MAX_WATCH_ID_BYTES => ids.push(id),
            serde_json::Value::String(_) => return bad("a client id is longer than 64 bytes"),
            _ => return bad("channel_names must hold strings"),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(Some(ids))
}

fn validate_view(raw: &RawCommand<'_>) -> Result<ViewSpec, ProtocolError> {
    let bad = |detail: &'static str| ProtocolError::new(ErrorCode::BadView, detail);
    let text = |v: &Option<serde_json::Value>, what: &'static str| match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(what)),
    };
    let sort = text(&raw.sort, "sort must be a string")?;
    let order = text(&raw.order, "order must be a string")?;
    let filter = text(&raw.filter, "filter must be a string")?;
    let offset = match &raw.offset {
        None | Some(serde_json::Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad("offset must be a whole number >= 0"))?,
    };
    let limit = match &raw.limit {
        None | Some(serde_json::Value::Null) => DEFAULT_VIEW_LIMIT,
        Some(v) => match v.as_u64() {
            Some(n) if n <= u64::from(MAX_VIEW_LIMIT) => n as u32,
            _ => return Err(bad("limit must be a whole number from 0 to 200")),
        },
    };
    Ok(ViewSpec {
        sort: parse_sort(sort.as_deref()).map_err(bad)?,
        order: parse_order(order.as_deref()).map_err(bad)?,
        filter: parse_filter(filter.as_deref()).map_err(bad)?,
        offset,
        limit,
    })
}

fn validate_device(v: Option<serde_json::Value>) -> Result<String, ProtocolError> {
    match v {
        Some(serde_json::Value::String(s)) if crate::ids::valid_device_secret(&s) => Ok(s),
        Some(serde_json::Value::String(_)) => Err(ProtocolError::new(
            ErrorCode::BadDevice,
            "secret must be 22 to 128 base64url characters (A-Z a-z 0-9 - _)",
        )),
        None | Some(serde_json::Value::Null) => Err(ProtocolError::new(
            ErrorCode::BadDevice,
            "secret is missing",
        )),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadDevice,
            "secret must be a string",
        )),
    }
}

fn validate_delay(v: Option<&serde_json::Value>) -> Result<f64, ProtocolError> {
    let Some(v) = v else {
        return Err(ProtocolError::new(
            ErrorCode::BadDelay,
            "delay_time is missing",
        ));
    };
    let Some(ms) = v.as_f64() else {
        return Err(ProtocolError::new(
            ErrorCode::BadDelay,
            "delay_time must be a number",
        ));
    };
    if !ms.is_finite() || !(0.0..=MAX_DELAY_MS).contains(&ms) {
        return Err(ProtocolError::new(
            ErrorCode::BadDelay,
            "delay_time must be a finite number of milliseconds in 0..=60000",
        ));
    }
    Ok(ms)
}

/// Most combining marks allowed in a row (a base letter with a few
/// diacritics is fine; a tall "zalgo" stack that draws over other rows is
/// not).
pub const MAX_COMBINING_MARKS: usize = 4;

/// Validates a requested name (the name policy, docs/protocol.md
/// "Rename") and returns it normalized (NFC) and trimmed.
///
/// # Errors
/// [`ErrorCode::BadName`] when, after normalizing and trimming, it is
/// empty, over 64 characters, without a visible character (a letter,
/// number, punctuation or symbol), holding a control, format (Cf), line or
/// paragraph separator, private-use, surrogate or unassigned code point,
/// holding more than [`MAX_COMBINING_MARKS`] combining marks in a row, or
/// shaped like a client id (16 hexadecimal digits), which would let it
/// pass for another client.
pub fn validate_name(name: &str) -> Result<String, ProtocolError> {
    use unicode_normalization::UnicodeNormalization;
    use unicode_properties::{GeneralCategory as G, GeneralCategoryGroup, UnicodeGeneralCategory};

    let bad = |detail: &'static str| Err(ProtocolError::new(ErrorCode::BadName, detail));
    let name: String = name.nfc().collect();
    let name = name.trim();
    if name.is_empty() {
        return bad("name is empty");
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return bad("name is longer than 64 characters");
    }
    let mut marks = 0;
    let mut visible = false;
    for c in name.chars() {
        match c.general_category() {
            G::Control => return bad("name contains control characters"),
            G::Format => return bad("name contains invisible format characters"),
            G::LineSeparator | G::ParagraphSeparator => {
                return bad("name contains line or paragraph separators");
            }
            G::PrivateUse | G::Surrogate | G::Unassigned => {
                return bad("name contains private-use or unassigned code points");
            }
            _ => {}
        }
        match c.general_category_group() {
            GeneralCategoryGroup::Mark => {
                marks += 1;
                if marks > MAX_COMBINING_MARKS {
                    return bad("name stacks too many combining marks");
                }
            }
            GeneralCategoryGroup::Separator => marks = 0,
            _ => {
                marks = 0;
                visible = true;
            }
        }
    }
    if !visible {
        return bad("name has no visible character");
    }
    if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("name looks like a client id");
    }
    Ok(name.to_owned())
}

/// The v1 pong without a sequence number, the most common frame of all.
pub const PONG_V1: &str = r#"{"command":"pong"}"#;

/// Writes a pong into `out` (cleared first): v1 echoes `seq` when sent, v2
/// adds `server_time` (Unix ms).
pub fn write_pong(out: &mut String, seq: Option<u64>, server_time_ms: Option<i64>) {
    out.clear();
    out.push_str(r#"{"command":"pong""#);
    if let Some(seq) = seq {
        let _ = write!(out, r#","seq":{seq}"#);
    }
    if let Some(t) = server_time_ms {
        let _ = write!(out, r#","server_time":{t}"#);
    }
    out.push('}');
}

/// A delay as the v1 protocol shows it: a number, or `"-"` before the
/// first sample. Whole numbers serialize without a fraction, as the
/// original app echoed the integers its pages sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct V1Delay(pub Option<f64>);

impl Serialize for V1Delay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_str("-"),
            Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => s.serialize_i64(x as i64),
            Some(x) => s.serialize_f64(x),
        }
    }
}

impl<'de> Deserialize<'de> for V1Delay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => Ok(V1Delay(n.as_f64())),
            serde_json::Value::String(s) if s == "-" => Ok(V1Delay(None)),
            other => Err(serde::de::Error::custom(format!(
                "expected a number or \"-\", got {other}"
            ))),
        }
    }
}

/// One client in a v1 `delay_times` roster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V1RosterEntry {
    /// Display name.
    pub name: String,
    /// Latest delay, or `"-"`.
    pub delay_time: V1Delay,
}

/// One client in a v2 `roster` snapshot; numbers are milliseconds, `null`
/// before the first sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct V2RosterEntry {
    /// Display name.
    pub name: String,
    /// The gateway the client is connected to.
    pub gateway: String,
    /// Latest delay.
    pub delay_time: Option<f64>,
    /// Median of recent samples.
    pub median: Option<f64>,
    /// Jitter of recent samples.
    pub jitter: Option<f64>,
}

/// Every message the server sends to a browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Reply to a ping.
    Pong {
        /// Echo of the ping's seq.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// Server clock, Unix ms (v2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server_time: Option<i64>,
    },
    /// v2: the first frame of every connection.
    Welcome {
        /// This client's id.
        channel_name: String,
        /// This client's name (its id at first).
        name: String,
        /// The gateway serving this connection.
        gateway: String,
        /// How often the page should ping.
        ping_interval_ms: u64,
        /// After how long without a pong a ping counts as lost.
        ping_timeout_ms: u64,
        /// Secret that lets this client read its own history.
        token: String,
        /// `public` or `private`.
        page: Page,
    },
    /// v1 public: the full roster, in reply to `delay_time`.
    DelayTimes {
        /// Every public client by id.
        delay_times: BTreeMap<String, V1RosterEntry>,
    },
    /// Earlier v2 public pages: the whole roster once, after welcome. No
    /// longer sent: v2 pages get a view (docs/protocol.md).
    Roster {
        /// Every public client by id.
        clients: BTreeMap<String, V2RosterEntry>,
    },
    /// A client joined the public page.
    Connect {
        /// Its id.
        channel_name: String,
        /// Its name.
        name: String,
        /// Its gateway (extra key; v1 pages ignore it).
        #[serde(default)]
        gateway: String,
    },
    /// A public client renamed itself.
    ChangeName {
        /// Its id.
        channel_name: String,
        /// The new name.
        name: String,
    },
    /// A public client left, or its gateway died.
    Disconnect {
        /// Its id.
        channel_name: String,
    },
    /// Earlier v2 public pages: the clients whose delay changed since the
    /// last tick. No longer sent: v2 pages get a view (docs/protocol.md).
    Delays {
        /// Changed clients by id.
        delay_times: BTreeMap<String, DelayStats>,
    },
    /// v2: the server-measured round trip of a WebSocket keepalive.
    ServerRtt {
        /// Milliseconds.
        rtt_ms: f64,
    },
    /// The frame was rejected; the connection stays open.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        detail: String,
    },
}

impl ServerMessage {
    /// The JSON text of this message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages serialize")
    }
}

/// WebSocket close codes the gateway uses.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Policy violation: the client sent too many messages.
    pub const POLICY: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Service restart: the gateway is draining; reconnect elsewhere.
    pub const RESTART: u16 = 1012;
    /// Try again later: the client fell behind and its queue overflowed.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Going away: the client was silent too long, or the connection
    /// broke.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error: a frame that breaks the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Invalid data: a text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client(text).unwrap_err().code
    }

    #[test]
    fn parses_every_v1_command() {
        assert_eq!(
            parse_client(r#"{"command":"ping"}"#),
            Ok(ClientCommand::Ping { seq: None })
        );
        assert_eq!(
            parse_client(r#"{"command":"delay_time","delay_time":12}"#),
            Ok(ClientCommand::DelayTime {
                delay_ms: 12.0,
                seq: None
            })
        );
        assert_eq!(
            parse_client(r#"{"command":"change_name","name":"  Ann "}"#),
            Ok(ClientCommand::ChangeName { name: "Ann".into() })
        );
    }

    #[test]
    fn parses_v2_fields_and_ignores_extra_keys() {
        assert_eq!(
            parse_client(r#"{"command":"ping","seq":7,"extra":[1,2]}"#),
            Ok(ClientCommand::Ping { seq: Some(7) })
        );
        assert_eq!(
            parse_client(r#"{"delay_time":12.345,"seq":8,"command":"delay_time"}"#),
            Ok(ClientCommand::DelayTime {
                delay_ms: 12.345,
                seq: Some(8)
            })
        );
        assert_eq!(
            parse_client(r#"{"command":"change_name","name":"J\u00fcrgen \ud83d\ude00"}"#),
            Ok(ClientCommand::ChangeName {
                name: "Jürgen 😀".into()
            })
        );
    }

    #[test]
    fn bad_json() {
        for text in [
            "",
            "ping",
            "{",
            "[]",
            "42",
            r#""ping""#,
            r#"{"cmd":"ping"}"#,
            r#"{"command":5}"#,
            r#"{"command":"ping","seq":-1}"#,
            r#"{"command":"ping","seq":"x"}"#,
            // JSON has no infinity: an overflowing number is malformed JSON.
            r#"{"command":"delay_time","delay_time":1e999}"#,
        ] {
            assert_eq!(code(text), ErrorCode::BadJson, "{text}");
        }
    }

    #[test]
    fn unknown_command() {
        assert_eq!(code(r#"{"command":"pong"}"#), ErrorCode::UnknownCommand);
        assert_eq!(code(r#"{"command":""}"#), ErrorCode::UnknownCommand);
        let e = parse_client(&format!(r#"{{"command":"{}"}}"#, "x".repeat(500))).unwrap_err();
        assert!(e.detail.len() < 100, "detail is bounded: {}", e.detail);
    }

    #[test]
    fn bad_delay() {
        for text in [
            r#"{"command":"delay_time"}"#,
            r#"{"command":"delay_time","delay_time":"12"}"#,
            r#"{"command":"delay_time","delay_time":null}"#,
            r#"{"command":"delay_time","delay_time":-0.5}"#,
            r#"{"command":"delay_time","delay_time":60000.01}"#,
        ] {
            assert_eq!(code(text), ErrorCode::BadDelay, "{text}");
        }
        assert!(parse_client(r#"{"command":"delay_time","delay_time":60000}"#).is_ok());
        assert!(parse_client(r#"{"command":"delay_time","delay_time":0}"#).is_ok());
    }

    #[test]
    fn bad_name() {
        let long = "é".repeat(65);
        for text in [
            r#"{"command":"change_name"}"#.to_owned(),
            r#"{"command":"change_name","name":"   "}"#.to_owned(),
            r#"{"command":"change_name","name":42}"#.to_owned(),
            r#"{"command":"change_name","name":"a\u0007b"}"#.to_owned(),
            r#"{"command":"change_name","name":"a\nb"}"#.to_owned(),
            format!(r#"{{"command":"change_name","name":"{long}"}}"#),
        ] {
            assert_eq!(code(&text), ErrorCode::BadName, "{text}");
        }
        let ok = "é".repeat(64);
        assert!(parse_client(&format!(r#"{{"command":"change_name","name":"{ok}"}}"#)).is_ok());
    }

    #[test]
    fn the_name_policy_refuses_invisible_impersonating_and_stacked_names() {
        let name = |n: &str| validate_name(n).map_err(|e| e.detail.into_owned());
        for bad in [
            "\u{202E}evil",                              // bidi override (Cf)
            "\u{200B}\u{200B}",                          // zero-width only (Cf)
            "a\u{2028}b",                                // line separator (Zl)
            "a\u{2029}b",                                // paragraph separator (Zp)
            "\u{FEFF}bob",                               // BOM (Cf)
            "bob\u{E0041}",                              // tag character (Cf)
            "\u{E000}",                                  // private use (Co)
            "a\u{0378}",                                 // unassigned (Cn)
            "\u{0301}\u{0301}",                          // marks only: nothing visible
            "\u{3000}",                                  // a wide space only
            "x\u{0301}\u{0302}\u{0303}\u{0304}\u{0305}", // 5 stacked marks
            "0123456789abcdef",                          // a client id's shape
            "0123456789ABCDEF",
        ] {
            assert!(name(bad).is_err(), "{bad:?} is accepted");
        }
        assert_eq!(name("  Zoë  ").unwrap(), "Zoë");
        assert_eq!(name("Zoe\u{0308}").unwrap(), "Zo\u{00EB}", "NFC");
        assert!(name("x\u{0301}\u{0302}\u{0303}\u{0304}").is_ok(), "4 marks");
        for good in [
            "Ann Lee",
            "李小龙",
            "مرحبا",
            "🙂",
            "0123456789abcde",
            "x-y_z.42",
        ] {
            assert_eq!(name(good).as_deref(), Ok(good), "{good:?}");
        }
    }

    #[test]
    fn watch() {
        assert_eq!(
            parse_client(r#"{"command":"watch","channel_names":["b","a","b"]}"#),
            Ok(ClientCommand::Watch {
                channel_names: Some(vec!["a".into(), "b".into()])
            }),
            "sorted, without repeats"
        );
        assert_eq!(
            parse_client(r#"{"command":"watch","channel_names":[]}"#),
            Ok(ClientCommand::Watch {
                channel_names: Some(vec![])
            })
        );
        for everyone in [
            r#"{"command":"watch"}"#,
            r#"{"command":"watch","channel_names":null}"#,
        ] {
            assert_eq!(
                parse_client(everyone),
                Ok(ClientCommand::Watch {
                    channel_names: None
                }),
                "{everyone}"
            );
        }
        let ids = |n: usize| {
            (0..n)
                .map(|i| format!("\"{i:016x}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        let max = format!(r#"{{"command":"watch","channel_names":[{}]}}"#, ids(200));
        assert!(max.len() < 4096, "the largest watch fits the frame limit");
        assert!(parse_client(&max).is_ok());
        let long = "x".repeat(65);
        for text in [
            format!(r#"{{"command":"watch","channel_names":[{}]}}"#, ids(201)),
            r#"{"command":"watch","channel_names":"a"}"#.to_owned(),
            r#"{"command":"watch","channel_names":{"a":1}}"#.to_owned(),
            r#"{"command":"watch","channel_names":["a",7]}"#.to_owned(),
            format!(r#"{{"command":"watch","channel_names":["{long}"]}}"#),
        ] {
            assert_eq!(code(&text), ErrorCode::BadWatch, "{text}");
        }
        // Other commands ignore the key.
        assert!(parse_client(r#"{"command":"ping","channel_names":5}"#).is_ok());
    }

    #[test]
    fn view_fields_default_and_are_checked() {
        assert_eq!(
            parse_client(r#"{"command":"view"}"#),
            Ok(ClientCommand::View(ViewSpec::default()))
        );
        assert_eq!(
            parse_client(
                r#"{"command":"view","sort":"delay","order":"desc","filter":"ÄnN","offset":10,"limit":200}"#
            ),
            Ok(ClientCommand::View(ViewSpec {
                sort: Sort::Delay,
                order: Order::Desc,
                filter: "änn".into(),
                offset: 10,
                limit: 200,
            }))
        );
        let long = "x".repeat(65);
        for text in [
            r#"{"command":"view","sort":"age"}"#.to_owned(),
            r#"{"command":"view","sort":1}"#.to_owned(),
            r#"{"command":"view","order":"up"}"#.to_owned(),
            r#"{"command":"view","offset":-1}"#.to_owned(),
            r#"{"command":"view","offset":1.5}"#.to_owned(),
            r#"{"command":"view","limit":201}"#.to_owned(),
            r#"{"command":"view","limit":"5"}"#.to_owned(),
            format!(r#"{{"command":"view","filter":"{long}"}}"#),
        ] {
            assert_eq!(code(&text), ErrorCode::BadView, "{text}");
        }
    }

    #[test]
    fn device_secrets_are_checked() {
        let ok = "a".repeat(43);
        assert_eq!(
            parse_client(&format!(r#"{{"command":"device","secret":"{ok}"}}"#)),
            Ok(ClientCommand::Device { secret: ok.clone() })
        );
        let min = "A-_z".repeat(6)[..22].to_owned();
        assert!(parse_client(&format!(r#"{{"command":"device","secret":"{min}"}}"#)).is_ok());
        let long = "b".repeat(129);
        for text in [
            r#"{"command":"device"}"#.to_owned(),
            r#"{"command":"device","secret":null}"#.to_owned(),
            r#"{"command":"device","secret":42}"#.to_owned(),
            r#"{"command":"device","secret":["x"]}"#.to_owned(),
            format!(r#"{{"command":"device","secret":"{}"}}"#, "c".repeat(21)),
            format!(r#"{{"command":"device","secret":"{long}"}}"#),
            format!(r#"{{"command":"device","secret":"{}="}}"#, "d".repeat(30)),
            format!(r#"{{"command":"device","secret":"{}+/"}}"#, "e".repeat(30)),
            format!(r#"{{"command":"device","secret":"{}é"}}"#, "f".repeat(30)),
        ] {
            assert_eq!(code(&text), ErrorCode::BadDevice, "{text}");
        }
        // Other commands ignore the key.
        assert!(parse_client(r#"{"command":"ping","secret":5}"#).is_ok());
    }

    #[test]
    fn error_frames_name_code_and_detail() {
        let frame = parse_client("nope").unwrap_err().to_frame();
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["command"], "error");
        assert_eq!(v["code"], "bad_json");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }

    #[test]
    fn pongs() {
        let mut s = String::new();
        write_pong(&mut s, None, None);
        assert_eq!(s, PONG_V1);
        write_pong(&mut s, Some(3), None);
        assert_eq!(s, r#"{"command":"pong","seq":3}"#);
        write_pong(&mut s, Some(4), Some(1_700_000_000_000));
        assert_eq!(
            s,
            r#"{"command":"pong","seq":4,"server_time":1700000000000}"#
        );
        let parsed: ServerMessage = serde_json::from_str(&s).unwrap();
        assert_eq!(
            parsed,
            ServerMessage::Pong {
                seq: Some(4),
                server_time: Some(1_700_000_000_000)
            }
        );
    }

    #[test]
    fn v1_messages_are_exactly_the_original_shapes() {
        let mut roster = BTreeMap::new();
        roster.insert(
            "a".to_owned(),
            V1RosterEntry {
                name: "a".into(),
                delay_time: V1Delay(None),
            },
        );
        roster.insert(
            "b".to_owned(),
            V1RosterEntry {
                name: "Bob".into(),
                delay_time: V1Delay(Some(12.0)),
            },
        );
        roster.insert(
            "c".to_owned(),
            V1RosterEntry {
                name: "C".into(),
                delay_time: V1Delay(Some(1.5)),
            },
        );
        assert_eq!(
            ServerMessage::DelayTimes {
                delay_times: roster
            }
            .to_json(),
            r#"{"command":"delay_times","delay_times":{"a":{"name":"a","delay_time":"-"},"b":{"name":"Bob","delay_time":12},"c":{"name":"C","delay_time":1.5}}}"#
        );
        assert_eq!(
            ServerMessage::ChangeName {
                channel_name: "a".into(),
                name: "N".into()
            }
            .to_json(),
            r#"{"command":"change_name","channel_name":"a","name":"N"}"#
        );
        assert_eq!(
            ServerMessage::Disconnect {
                channel_name: "a".into()
            }
            .to_json(),
            r#"{"command":"disconnect","channel_name":"a"}"#
        );
        let connect: serde_json::Value = serde_json::from_str(
            &ServerMessage::Connect {
                channel_name: "a".into(),
                name: "a".into(),
                gateway: "g".into(),
            }
            .to_json(),
        )
        .unwrap();
        assert_eq!(connect["command"], "connect");
        assert_eq!(connect["channel_name"], "a");
        assert_eq!(connect["name"], "a");
    }

    #[test]
    fn v2_messages_round_trip() {
        let msgs = vec![
            ServerMessage::Welcome {
                channel_name: "id".into(),
                name: "id".into(),
                gateway: "gw".into(),
                ping_interval_ms: 1000,
                ping_timeout_ms: 3000,
                token: "t".into(),
                page: Page::Public,
            },
            ServerMessage::Delays {
                delay_times: [(
                    "id".to_owned(),
                    DelayStats {
                        delay_time: 1.0,
                        median: 2.0,
                        jitter: 0.5,
                    },
                )]
                .into(),
            },
            ServerMessage::ServerRtt { rtt_ms: 0.25 },
            ServerMessage::Error {
                code: ErrorCode::BadName,
                detail: "x".into(),
            },
        ];
        for m in msgs {
            let back: ServerMessage = serde_json::from_str(&m.to_json()).unwrap();
            assert_eq!(back, m);
        }
    }
}

/// The parser against a million random frames (docs/security.md, "Fuzzing
/// the protocol"): JSON-ish text built from the protocol's own keys and
/// values, then mangled (cut, spliced, sprinkled with odd characters).
/// Whatever comes in, parsing returns, a command meets its documented
/// bounds, and an error becomes a well-formed error frame.
#[cfg(test)]
mod fuzz {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const KEYS: &[&str] = &[
        "command",
        "seq",
        "delay_time",
        "name",
        "channel_names",
        "sort",
        "order",
        "filter",
        "offset",
        "limit",
        "secret",
        "x",
        "",
        "Command",
    ];
    const COMMANDS: &[&str] = &[
        "ping",
        "delay_time",
        "change_name",
        "watch",
        "view",
        "device",
        "pong",
        "",
        "PING",
        "ping ",
    ];
    const ODD: &[&str] = &[
        "\u{0}",
        "\u{7}",
        "\u{202e}",
        "\u{200b}",
        "\u{feff}",
        "\u{2028}",
        "\u{e000}",
        "\u{301}",
        "\u{e0041}",
        "\u{10ffff}",
        "\"",
        "\\",
        "\\u0000",
        "\\ud800",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        " ",
        "\n",
        "é",
        "日本",
        "🙂",
    ];

    fn number(rng: &mut StdRng) -> String {
        match rng.random_range(0..9) {
            0 => rng.random_range(0..100_000u32).to_string(),
            1 => format!("{:.3}", rng.random_range(-1.0..70_000.0f64)),
            2 => "-0".into(),
            3 => "1e309".into(),
            4 => "18446744073709551616".into(),
            5 => u64::MAX.to_string(),
            6 => "-1".into(),
            7 => "60000.0001".into(),
            _ => format!(
                "{}e{}",
                rng.random_range(0..10),
                rng.random_range(-400..400)
            ),
        }
    }

    fn string(rng: &mut StdRng) -> String {
        if rng.random_ratio(1, 40) {
            // Secret-shaped: base64url characters, around the accepted
            // lengths of a device secret.
            const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let len = rng.random_range(18..140);
            let body: String = (0..len)
                .map(|_| char::from(B64[rng.random_range(0..B64.len())]))
                .collect();
            return format!("\"{body}\"");
        }
        let mut s = String::from("\"");
        for _ in 0..rng.random_range(0..12) {
            match rng.random_range(0..4) {
                0 => s.push_str(ODD[rng.random_range(0..ODD.len())]),
                1 => s.push_str(COMMANDS[rng.random_range(0..COMMANDS.len())]),
                _ => s.push(rng.random_range('a'..='z')),
            }
        }
        if rng.random_ratio(1, 50) {
            s.push_str(&"w".repeat(rng.random_range(60..200)));
        }
        s.push('"');
        s
    }

    fn value(rng: &mut StdRng, depth: u32) -> String {
        match rng.random_range(0..if depth > 2 { 5 } else { 7 }) {
            0 => number(rng),
            1 | 2 => string(rng),
            3 => ["null", "true", "false"][rng.random_range(0..3)].into(),
            4 => format!("\"{}\"", COMMANDS[rng.random_range(0..COMMANDS.len())]),
            5 => {
                let items: Vec<String> = (0..rng.random_range(0..6))
                    .map(|_| value(rng, depth + 1))
                    .collect();
                format!("[{}]", items.join(","))
            }
            _ => object(rng, depth + 1),
        }
    }

    fn object(rng: &mut StdRng, depth: u32) -> String {
        let mut fields = Vec::new();
        if rng.random_ratio(9, 10) {
            fields.push(format!(
                "\"command\":\"{}\"",
                COMMANDS[rng.random_range(0..COMMANDS.len())]
            ));
        }
        for _ in 0..rng.random_range(0..5) {
            let key = KEYS[rng.random_range(0..KEYS.len())];
            fields.push(format!("\"{key}\":{}", value(rng, depth)));
        }
        // Shuffle by rotation: duplicates and orders both occur.
        if !fields.is_empty() {
            let k = rng.random_range(0..fields.len());
            fields.rotate_left(k);
        }
        format!("{{{}}}", fields.join(","))
    }

    fn frame(rng: &mut StdRng) -> String {
        let mut text = object(rng, 0);
        match rng.random_range(0..10) {
            0 => {
                // Cut at a character boundary.
                let mut cut = rng.random_range(0..=text.len());
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
            }
            1 => {
                let mut at = rng.random_range(0..=text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, ODD[rng.random_range(0..ODD.len())]);
            }
            2 => text = value(rng, 0),
            3 => {
                text = (0..rng.random_range(0..20))
                    .map(|_| char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('?'))
                    .collect()
            }
            _ => {}
        }
        text
    }

    /// Checks the invariants for one frame; true when it parsed.
    fn check(text: &str) -> bool {
        let parsed = parse_client(text);
        let ok = parsed.is_ok();
        match parsed {
            Ok(ClientCommand::Ping { .. }) => {}
            Ok(ClientCommand::DelayTime { delay_ms, .. }) => assert!(
                delay_ms.is_finite() && (0.0..=MAX_DELAY_MS).contains(&delay_ms),
                "{text:?} gave delay {delay_ms}"
            ),
            Ok(ClientCommand::ChangeName { name }) => {
                assert_eq!(validate_name(&name).as_ref(), Ok(&name), "{text:?}");
                let chars = name.chars().count();
                assert!((1..=MAX_NAME_CHARS).contains(&chars), "{text:?}");
            }
            Ok(ClientCommand::Device { secret }) => {
                assert!(crate::ids::valid_device_secret(&secret), "{text:?}");
            }
            Ok(ClientCommand::View(view)) => {
                assert!(view.limit <= MAX_VIEW_LIMIT, "{text:?}");
                assert_eq!(view.filter, view.filter.to_lowercase(), "{text:?}");
            }
            Ok(ClientCommand::Watch { channel_names }) => {
                let ids = channel_names.unwrap_or_default();
                assert!(ids.len() <= MAX_WATCH_IDS, "{text:?}");
                assert!(ids.iter().all(|id| id.len() <= MAX_WATCH_ID_BYTES));
                let unique: std::collections::BTreeSet<_> = ids.iter().collect();
                assert_eq!(unique.len(), ids.len(), "{text:?}: repeats");
            }
            Err(e) => {
                let frame: serde_json::Value =
                    serde_json::from_str(&e.to_frame()).expect("error frames are JSON");
                assert_eq!(frame["command"], "error", "{text:?}");
                assert_eq!(frame["code"], e.code.as_str(), "{text:?}");
            }
        }
        ok
    }

    #[test]
    fn a_million_random_frames() {
        // Four seeded streams of 250,000 on threads of their own: the same
        // million cases every run, in a quarter of the time on four cores.
        let counts: Vec<(u32, u32)> = std::thread::scope(|scope| {
            let streams: Vec<_> = (0..4u64)
                .map(|stream| {
                    scope.spawn(move || {
                        let mut rng = StdRng::seed_from_u64(0x0070_726f_746f + stream);
                        let (mut ok, mut err) = (0u32, 0u32);
                        for _ in 0..250_000 {
                            if check(&frame(&mut rng)) {
                                ok += 1;
                            } else {
                                err += 1;
                            }
                        }
                        (ok, err)
                    })
                })
                .collect();
            streams
                .into_iter()
                .map(|t| t.join().expect("no case panics"))
                .collect()
        });
        let (ok, err) = counts
            .iter()
            .fold((0, 0), |(a, b), (ok, err)| (a + ok, b + err));
        assert_eq!(ok + err, 1_000_000);
        // The generator reaches both sides of the parser.
        assert!(ok > 50_000 && err > 50_000, "ok {ok}, err {err}");
    }
}
