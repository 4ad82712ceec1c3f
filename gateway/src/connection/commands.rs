//! One handler per client command (docs/protocol.md): each answers or
//! acts, and returns `Err` only when the connection must end.

use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes};
use services::ids::device_digest;
use services::messages::SampleRecord;
use services::protocol::{
    ClientCommand, ErrorCode, PONG_V1, ProtocolError, Version, parse_client, write_pong,
};

use super::pongs::Refusal;
use super::{Connection, Ending};

impl Connection {
    /// Parses a text frame and hands it to its command's handler; a frame
    /// that is not a valid command gets an error frame.
    pub(super) async fn on_text(
        &mut self,
        text: Utf8Bytes,
        received: Instant,
    ) -> Result<(), Ending> {
        match parse_client(text.as_str()) {
            Ok(ClientCommand::Ping { seq }) => self.on_ping(seq, received).await,
            // Boxed (see `serve`): one allocation per sample or rename, and
            // a smaller future for every connection.
            Ok(ClientCommand::DelayTime { delay_ms, seq }) => {
                Box::pin(self.on_delay(delay_ms, seq, received)).await
            }
            Ok(ClientCommand::ChangeName { name }) => Box::pin(self.on_change_name(name)).await,
            Ok(ClientCommand::Watch { .. }) => {
                // Superseded by `view`, whose frames only ever carry the
                // rows in view (docs/protocol.md): accepted and ignored.
                self.count_in("watch");
                Ok(())
            }
            Ok(ClientCommand::View(spec)) => {
                self.count_in("view");
                // Its answer comes through the page's queue (`Room::set_view`);
                // v1 and private pages have no view: accepted and ignored.
                if let Some(seat) = &self.seat {
                    self.shared.room.set_view(seat, spec);
                }
                Ok(())
            }
            Ok(ClientCommand::Device { secret }) => Box::pin(self.on_device(&secret)).await,
            Err(e) => {
                if e.code == ErrorCode::BadDevice {
                    self.count_in("device");
                } else {
                    self.count_in("invalid");
                }
                Box::pin(self.send_error(&e)).await
            }
        }
    }

    /// The hot path: a pong, written here and now.
    async fn on_ping(&mut self, seq: Option<u64>, received: Instant) -> Result<(), Ending> {
        self.hot.ping_in.inc();
        let frame = match (self.version, seq) {
            (Version::V1, None) => Utf8Bytes::from_static(PONG_V1),
            (Version::V1, Some(_)) => {
                write_pong(&mut self.pong_buf, seq, None);
                Utf8Bytes::from(self.pong_buf.clone())
            }
            (Version::V2, _) => {
                write_pong(&mut self.pong_buf, seq, Some(services::unix_ms()));
                Utf8Bytes::from(self.pong_buf.clone())
            }
        };
        self.write(Message::Text(frame)).await?;
        self.pongs.sent(seq, received);
        self.hot.pong_out.inc();
        self.hot.pings.inc();
        self.hot
            .ping_duration
            .observe(received.elapsed().as_secs_f64());
        Ok(())
    }

    /// A delay sample: checked against the pongs sent ([`super::pongs`];
    /// refused: an error frame in v2, dropped in v1), then recorded (every
    /// page, for its own history); a public client's statistics go to the
    /// room, and a v1 public page gets the whole roster back, as the
    /// original app did.
    async fn on_delay(
        &mut self,
        delay_ms: f64,
        seq: Option<u64>,
        received: Instant,
    ) -> Result<(), Ending> {
        self.count_in("delay_time");
        let margin = Duration::from_millis(self.shared.args.max_delay_excess_ms);
        if let Err(refusal) = self.pongs.take(seq, self.v2(), delay_ms, received, margin) {
            self.shared
                .metrics
                .samples_refused
                .with_label_values(&[refusal.as_str()])
                .inc();
            if !self.v2() {
                return Ok(());
            }
            let detail = match refusal {
                Refusal::NoPong => "delay_time needs the seq of a pong not yet used",
                Refusal::Implausible => "delay_time is longer than the time since that ping",
            };
            let e = ProtocolError {
                code: ErrorCode::BadSample,
                detail: detail.into(),
            };
            return self.send_error(&e).await;
        }
        self.shared
            .metrics
            .client_delay
            .with_label_values(&[self.page.as_str()])
            .observe(delay_ms / 1000.0);
        let stats = self.stats.push(delay_ms);
        self.samples += 1;
        let sample = SampleRecord {
            channel_name: self.id.clone(),
            n: self.samples,
            seq,
            at_us: services::unix_us(),
            delay_ms,
            public: self.public(),
        };
        // Never waits: at the buffer's bound the sample is refused and the
        // client told, so its pings keep being answered (persist.rs).
        if self
            .shared
            .records
            .offer_sample(sample, &mut self.unrecorded)
            .is_err()
        {
            let e = ProtocolError {
                code: ErrorCode::Busy,
                detail: "samples cannot be stored right now; this one was not recorded".into(),
            };
            self.send_error(&e).await?;
        }
        let Some(seat) = &self.seat else {
            return Ok(());
        };
        self.shared.room.note_delay(seat, stats);
        if self.version == Version::V1 {
            let frame = self.shared.room.v1_frame(seat);
            return self.send(frame, "delay_times").await;
        }
        Ok(())
    }

    /// A rename: public pages only (the private page has no roster).
    async fn on_change_name(&mut self, name: String) -> Result<(), Ending> {
        self.count_in("change_name");
        let Some(seat) = &self.seat else {
            let e = ProtocolError {
                code: ErrorCode::UnknownCommand,
                detail: "change_name is only available on the public page".into(),
            };
            return self.send_error(&e).await;
        };
        if !self.renames.admit(Instant::now(), 1.0) {
            let e = ProtocolError {
                code: ErrorCode::TooManyRenames,
                detail: "too many renames; try again in a minute".into(),
            };
            return self.send_error(&e).await;
        }
        self.name.clone_from(&name);
        self.shared.room.rename(seat, name).await;
        Ok(())
    }

    /// A browser identity (docs/protocol.md, "Your history"): v2 only,
    /// once, and before the first recorded sample, which carries the
    /// client's record and with it the digest. Refused: `bad_device`, and
    /// the connection goes on as its own.
    async fn on_device(&mut self, secret: &str) -> Result<(), Ending> {
        self.count_in("device");
        let refusal = if !self.v2() {
            Some("device is only available with ?v=2")
        } else {
            match self.unrecorded.as_mut() {
                None => Some("device must come before the connection's first recorded sample"),
                Some(record) if record.device.is_some() => {
                    Some("this connection already presented a device")
                }
                Some(record) => {
                    // Only the digest is kept: the secret goes no further.
                    record.device = Some(device_digest(secret));
                    None
                }
            }
        };
        match refusal {
            None => Ok(()),
            Some(detail) => {
                let e = ProtocolError {
                    code: ErrorCode::BadDevice,
                    detail: detail.into(),
                };
                self.send_error(&e).await
            }
        }
    }

    fn count_in(&self, command: &str) {
        self.shared
            .metrics
            .messages_in
            .with_label_values(&[command])
            .inc();
    }
}
