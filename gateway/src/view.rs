//! The frames of a public v2 page's view (docs/protocol.md, "Public room:
//! the view"): a window of rows, computed by [`crate::mirror::Mirror::window`]
//! once per distinct view and tick, and serialized here once for every page
//! that has that view.

use serde::Serialize;
use services::messages::RosterClient;
use services::protocol::{Order, Sort, ViewSpec};

/// One row of a view, as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The client's id.
    pub channel_name: String,
    /// Its name.
    pub name: String,
    /// Its gateway.
    pub gateway: String,
    /// Latest sample, ms.
    pub delay_time: Option<f64>,
    /// Median over the server's recent window, ms.
    pub median: Option<f64>,
    /// Jitter over the server's recent window, ms.
    pub jitter: Option<f64>,
}

impl Row {
    /// The row of a roster client.
    pub fn of(c: &RosterClient) -> Self {
        Self {
            channel_name: c.channel_name.clone(),
            name: c.name.clone(),
            gateway: c.gateway.clone(),
            delay_time: c.stats.map(|s| s.delay_time),
            median: c.stats.map(|s| s.median),
            jitter: c.stats.map(|s| s.jitter),
        }
    }

    /// The row's JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("rows serialize")
    }
}

/// A view's window at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The roster version it was computed at (see
    /// [`crate::mirror::Mirror::version`]).
    pub version: u64,
    /// Public clients in the room.
    pub total: usize,
    /// Of them, those the filter keeps.
    pub matched: usize,
    /// The rows, in order.
    pub rows: Vec<Row>,
}

#[derive(Serialize)]
struct FullFrame<'a> {
    command: &'static str,
    sort: Sort,
    order: Order,
    filter: &'a str,
    offset: u64,
    limit: u32,
    total: usize,
    matched: usize,
    rows: &'a [Row],
}

/// The `view` frame: the whole window.
pub fn full_frame(spec: &ViewSpec, w: &Window) -> String {
    serde_json::to_string(&FullFrame {
        command: "view",
        sort: spec.sort,
        order: spec.order,
        filter: &spec.filter,
        offset: spec.offset,
        limit: spec.limit,
        total: w.total,
        matched: w.matched,
        rows: &w.rows,
    })
    .expect("view frames serialize")
}

/// What a page with the view must be sent to go from `old` to `new`: the
/// whole window when its rows are other rows or in another order, a
/// `view_update` with the changed rows and the counts when only rows'
/// contents or the counts changed, nothing when nothing did.
pub fn diff_frame(spec: &ViewSpec, old: &Window, new: &Window) -> Option<String> {
    let same_ids = old.rows.len() == new.rows.len()
        && old
            .rows
            .iter()
            .zip(&new.rows)
            .all(|(a, b)| a.channel_name == b.channel_name);
    if !same_ids {
        return Some(full_frame(spec, new));
    }
    let changed: Vec<&Row> = old
        .rows
        .iter()
        .zip(&new.rows)
        .filter(|(a, b)| a != b)
        .map(|(_, b)| b)
        .collect();
    if changed.is_empty() && old.total == new.total && old.matched == new.matched {
        return None;
    }
    Some(update_frame(new.total, new.matched, &changed))
}

/// A `view_update` frame: the counts, and the changed rows by id (no
/// `rows` key when none changed).
pub fn update_frame(total: usize, matched: usize, changed: &[&Row]) -> String {
    let mut out = format!(r#"{{"command":"view_update","total":{total},"matched":{matched}"#);
    if !changed.is_empty() {
        out.push_str(r#","rows":{"#);
        for (i, row) in changed.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(&row.channel_name).expect("ids serialize"));
            out.push(':');
            out.push_str(&row.to_json());
        }
        out.push('}');
    }
    out.push('}');
    out
}

/// `frame` (a JSON object) with the page's own row added as `me`.
pub fn with_me(frame: &str, me_json: &str) -> String {
    let body = frame.strip_suffix('}').expect("frames are JSON objects");
    let mut out = String::with_capacity(frame.len() + me_json.len() + 6);
    out.push_str(body);
    out.push_str(r#","me":"#);
    out.push_str(me_json);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, name: &str, delay: Option<f64>) -> Row {
        Row {
            channel_name: id.into(),
            name: name.into(),
            gateway: "g".into(),
            delay_time: delay,
            median: delay,
            jitter: delay.map(|_| 0.0),
        }
    }

    fn window(total: usize, rows: Vec<Row>) -> Window {
        Window {
            version: 0,
            total,
            matched: total,
            rows,
        }
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn frames_carry_the_window_or_only_what_changed() {
        let spec = ViewSpec::default();
        let a = window(2, vec![row("a", "ann", None), row("b", "bob", Some(1.0))]);
        let full = json(&full_frame(&spec, &a));
        assert_eq!(full["command"], "view");
        assert_eq!(full["limit"], 50);
        assert_eq!(full["rows"][1]["channel_name"], "b");
        assert_eq!(full["rows"][0]["delay_time"], serde_json::Value::Null);

        assert_eq!(diff_frame(&spec, &a, &a.clone()), None, "nothing changed");
        let mut counted = a.clone();
        counted.total = 3;
        counted.matched = 3;
        assert_eq!(
            json(&diff_frame(&spec, &a, &counted).unwrap()),
            serde_json::json!({"command": "view_update", "total": 3, "matched": 3})
        );
        let mut delayed = a.clone();
        delayed.rows[0] = row("a", "ann", Some(4.0));
        let up = json(&diff_frame(&spec, &a, &delayed).unwrap());
        assert_eq!(up["command"], "view_update");
        assert_eq!(up["rows"]["a"]["delay_time"], 4.0);
        assert!(up["rows"].get("b").is_none(), "only the changed row");
        let moved = window(2, vec![row("b", "bob", Some(1.0)), row("a", "ann", None)]);
        assert_eq!(
            json(&diff_frame(&spec, &a, &moved).unwrap())["command"],
            "view"
        );

        let me = row("m", "me", Some(2.5)).to_json();
        let framed = json(&with_me(&update_frame(1, 1, &[]), &me));
        assert_eq!(framed["me"]["channel_name"], "m");
        assert_eq!(framed["total"], 1);
    }
}
