//! Frame metering below the WebSocket library (docs/security.md,
//! "Per-connection budgets").
//!
//! The WebSocket library reassembles fragmented messages before the
//! connection loop sees them, and reads every frame already buffered in one
//! call: a client sending one endless message of empty continuation frames
//! would cost CPU without the loop ever seeing a message to count. So every
//! TCP connection of the public listener reads through [`Metered`], which
//! does nothing until the request is upgraded; from then on it parses the
//! header of every frame the client sends (data, continuation and control
//! frames alike) and charges it against the connection's [`Budget`] before
//! the library sees the bytes. A frame over the budget, or one the library
//! would refuse anyway (unmasked, reserved bits or opcodes, a fragmented or
//! oversized control frame, a frame over its size limit), trips the meter:
//! the read fails, and the connection loop closes with the code of the
//! [`Trip`] (1008, 1009 or 1002).
//!
//! RFC 6455 (4.1) forbids a client to send frames before the server's
//! handshake answer. Bytes that arrive with the upgrade request itself are
//! read by the HTTP server before the meter is armed and are not parsed;
//! if such early data ends inside a frame, the meter reads the rest out of
//! step. It then still charges every byte against the byte budget (and
//! refuses what is not a valid client frame header), so frames per second
//! stay bounded by the byte budget over the smallest frame (6 bytes).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Ending;
use super::rate::Budget;

/// Why the meter stopped a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// Over the frame or byte budget: close 1008.
    TooFast,
    /// A frame over the library's frame size limit: close 1009.
    TooBig,
    /// Not a valid client frame: close 1002.
    Protocol,
}

impl Trip {
    /// The ending (and close code) of the connection.
    pub fn ending(self) -> Ending {
        match self {
            Trip::TooFast => Ending::TooFast,
            Trip::TooBig => Ending::TooBig,
            Trip::Protocol => Ending::Protocol,
        }
    }
}

/// Where the parser is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum Scan {
    /// Reading a frame header: `have` of its bytes so far.
    Header { buf: [u8; 14], have: u8 },
    /// Skipping `left` payload bytes.
    Payload { left: u64 },
}

/// Parses client frame headers out of a byte stream, whatever the chunks.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    scan: Scan,
    max_frame: u64,
}

/// One frame header, as the scanner read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The opcode (0 continuation, 1 text, 2 binary, 8 close, 9 ping, 10 pong).
    pub opcode: u8,
    /// The FIN bit.
    pub fin: bool,
    /// Payload length.
    pub len: u64,
}

impl FrameScanner {
    /// A scanner at a frame boundary; frames longer than `max_frame` bytes
    /// are refused.
    pub fn new(max_frame: u64) -> Self {
        Self {
            scan: Scan::Header {
                buf: [0; 14],
                have: 0,
            },
            max_frame,
        }
    }

    /// Feeds the next bytes of the stream; calls `on_frame` for every
    /// complete header, in order, and stops at the first error.
    ///
    /// # Errors
    /// A header no client may send, or what `on_frame` returns.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut on_frame: impl FnMut(FrameHeader) -> Result<(), Trip>,
    ) -> Result<(), Trip> {
        while !bytes.is_empty() {
            match &mut self.scan {
                Scan::Payload { left } => {
                    let skip = (*left).min(bytes.len() as u64);
                    *left -= skip;
                    bytes = &bytes[skip as usize..];
                    if *left == 0 {
                        self.scan = Scan::Header {
                            buf: [0; 14],
                            have: 0,
                        };
                    }
                }
                Scan::Header { buf, have } => {
                    buf[usize::from(*have)] = bytes[0];
                    *have += 1;
                    bytes = &bytes[1..];
                    if let Some(header) = complete_header(&buf[..usize::from(*have)])? {
                        if header.len > self.max_frame {
                            return Err(Trip::TooBig);
                        }
                        on_frame(header)?;
                        self.scan = if header.len == 0 {
                            Scan::Header {
                                buf: [0; 14],
                                have: 0,
                            }
                        } else {
                            Scan::Payload { left: header.len }
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// The header in `h` if it is complete, `None` if more bytes are needed.
fn complete_header(h: &[u8]) -> Result<Option<FrameHeader>, Trip> {
    if h.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (h[0], h[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    if b0 & 0x70 != 0 || b1 & 0x80 == 0 || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
        // Reserved bits, an unmasked client frame, a reserved opcode.
        return Err(Trip::Protocol);
    }
    let len7 = b1 & 0x7f;
    if opcode >= 8 && (!fin || len7 > 125) {
        return Err(Trip::Protocol);
    }
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    // Two bytes, the extended length, the 4-byte mask.
    if h.len() < 2 + ext + 4 {
        return Ok(None);
    }
    let len = match ext {
        0 => u64::from(len7),
        _ => h[2..2 + ext]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    };
    Ok(Some(FrameHeader { opcode, fin, len }))
}

/// What an armed meter holds.
#[derive(Debug)]
struct Armed {
    budget: Budget,
    scanner: FrameScanner,
}

#[derive(Debug, Default)]
struct MeterState {
    armed: Option<Armed>,
    tripped: Option<Trip>,
}

/// One TCP connection's meter, shared by its [`Metered`] stream and, once
/// upgraded, its WebSocket connection loop.
#[derive(Debug, Default)]
pub struct WireMeter {
    state: Mutex<MeterState>,
    /// Whether a [`Metered`] stream feeds it (false for a connection not
    /// accepted by the gateway's own server, e.g. a test's `axum::serve`).
    wired: bool,
}

impl WireMeter {
    /// A meter for a stream wrapped in [`Metered`].
    pub fn wired() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            wired: true,
        })
    }

    /// A meter no stream feeds: the connection loop charges whole messages
    /// to it instead ([`WireMeter::admit_message`]).
    pub fn unwired() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, MeterState> {
        // Nothing panics while holding the lock; a poisoned one still holds
        // consistent counters.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts charging the client's frames to `budget` (at the upgrade);
    /// frames over `max_frame` bytes are refused.
    pub fn arm(&self, budget: Budget, max_frame: u64) {
        self.state().armed = Some(Armed {
            budget,
            scanner: FrameScanner::new(max_frame),
        });
    }

    /// Why the meter stopped the connection, if it did.
    pub fn tripped(&self) -> Option<Trip> {
        self.state().tripped
    }

    /// Charges the bytes just read at `at`.
    fn observe(&self, bytes: &[u8], at: Instant) -> Result<(), Trip> {
        let mut state = self.state();
        if let Some(trip) = state.tripped {
            return Err(trip);
        }
        let Some(armed) = state.armed.as_mut() else {
            return Ok(());
        };
        let Armed { budget, scanner } = armed;
        let result = scanner.feed(bytes, |header| {
            if budget.admit(at, header.len as usize) {
                Ok(())
            } else {
                Err(Trip::TooFast)
            }
        });
        if let Err(trip) = result {
            state.tripped = Some(trip);
        }
        result
    }

    /// For the connection loop, per message: true when the message is
    /// within budget. A wired meter has already charged its frames; an
    /// unwired one charges the message as one frame of `len` bytes.
    pub fn admit_message(&self, at: Instant, len: usize) -> bool {
        if self.wired {
            return true;
        }
        let mut state = self.state();
        match state.armed.as_mut() {
            Some(armed) => armed.budget.admit(at, len),
            None => true,
        }
    }
}

/// Most bytes a connection's socket may owe before its writes wait: the
/// bytes the kernel did not take yet, held in [`Metered`]'s spill buffer.
pub const MAX_SPILL_BYTES: usize = 64 * 1024;

/// A byte stream whose reads are charged to a [`WireMeter`].
///
/// Its writes take every byte at once while the socket owes fewer than
/// [`MAX_SPILL_BYTES`]: what the kernel does not take yet waits in a spill
/// buffer that is released as soon as it is written out. The WebSocket
/// library keeps the capacity of the largest data it ever had to hold
/// back, per connection and for good; with the spill it only ever holds
/// one frame (docs/benchmarks.md, "Memory per public connection").
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    meter: Arc<WireMeter>,
    /// Bytes accepted from the writer that the socket has not taken yet;
    /// empty (no allocation) whenever the socket keeps up.
    spill: Vec<u8>,
}

impl<S> Metered<S> {
    /// Wraps `inner`; `meter` should come from [`WireMeter::wired`].
    pub fn new(inner: S, meter: Arc<WireMeter>) -> Self {
        Self {
            inner,
            meter,
            spill: Vec::new(),
        }
    }
}

impl<S: AsyncWrite + Unpin> Metered<S> {
    /// Writes the spill out; ready once it is empty (and released).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.spill.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.spill) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.spill.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.spill = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Keeps `rest` in the spill if it fits; how many bytes it took.
    fn spill(&mut self, rest: &[u8]) -> usize {
        if self.spill.len() + rest.len() > MAX_SPILL_BYTES {
            return 0;
        }
        self.spill.extend_from_slice(rest);
        rest.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                match this.meter.observe(read, Instant::now()) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(trip) => {
                        buf.set_filled(before);
                        Poll::Ready(Err(io::Error::other(format!("frame meter: {trip:?}"))))
                    }
                }
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Bytes go out in order: the spill first.
        match this.poll_drain(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                return match this.spill(buf) {
                    0 => Poll::Pending,
                    n => Poll::Ready(Ok(n)),
                };
            }
            Poll::Ready(Ok(())) => {}
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) if n > 0 && n < buf.len() => {
                Poll::Ready(Ok(n + this.spill(&buf[n..])))
            }
            Poll::Pending => match this.spill(buf) {
                0 => Poll::Pending,
                n => Poll::Ready(Ok(n)),
            },
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.spill.is_empty() {
            // The HTTP server's vectored writes before the upgrade: as is.
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A masked client frame (zero mask: the payload is sent as is).
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        f
    }

    fn headers(stream: &[u8], chunk: usize) -> Result<Vec<FrameHeader>, Trip> {
        let mut s = FrameScanner::new(1 << 16);
        let mut seen = Vec::new();
        for c in stream.chunks(chunk.max(1)) {
            s.feed(c, |h| {
                seen.push(h);
                Ok(())
            })?;
        }
        Ok(seen)
    }

    #[test]
    fn every_frame_is_seen_whatever_the_chunks() {
        let mut stream = frame(0x01, b"{\"command\"");
        for _ in 0..1000 {
            stream.extend(frame(0x00, b""));
        }
        stream.extend(frame(0x89, b"ping"));
        stream.extend(frame(0x80, &[b'x'; 300]));
        stream.extend(frame(0x82, &[7; 70_000][..60_000]));
        for chunk in [1, 2, 3, 7, 64, 1 << 20] {
            let seen = headers(&stream, chunk).expect("valid frames");
            assert_eq!(seen.len(), 1004, "chunks of {chunk}");
            assert_eq!(seen.iter().filter(|h| h.opcode == 0).count(), 1001);
            assert_eq!((seen[1001].opcode, seen[1001].len), (9, 4));
            assert_eq!((seen[1002].opcode, seen[1002].len), (0, 300));
            assert_eq!((seen[1003].opcode, seen[1003].len), (2, 60_000));
        }
    }

    #[test]
    fn frames_no_client_may_send_trip_the_meter() {
        let unmasked = vec![0x81, 0x00];
        let rsv = frame(0x91, b"x");
        let reserved_opcode = frame(0x83, b"");
        let fragmented_ping = frame(0x09, b"");
        let long_ping = frame(0x89, &[0; 126]);
        for bad in [unmasked, rsv, reserved_opcode, fragmented_ping, long_ping] {
            assert_eq!(headers(&bad, 1), Err(Trip::Protocol), "{bad:x?}");
        }
        let huge = frame(0x82, &vec![0; (1 << 16) + 1]);
        assert_eq!(headers(&huge, 1 << 20), Err(Trip::TooBig));
    }

    #[test]
    fn empty_continuations_count_against_the_frame_budget() {
        let meter = WireMeter::wired();
        meter
            .observe(b"GET / HTTP/1.1\r\n\r\n", Instant::now())
            .unwrap();
        meter.arm(Budget::new(50, 65_536, 4096), 1 << 16);
        let t0 = Instant::now();
        let mut stream = frame(0x01, b"{");
        for _ in 0..49 {
            stream.extend(frame(0x00, b""));
        }
        assert_eq!(meter.observe(&stream, t0), Ok(()), "the burst of 50");
        assert_eq!(
            meter.observe(&frame(0x00, b""), t0),
            Err(Trip::TooFast),
            "the 51st frame in the same instant"
        );
        assert_eq!(meter.tripped(), Some(Trip::TooFast));
        assert_eq!(
            meter.observe(b"", t0 + Duration::from_secs(10)),
            Err(Trip::TooFast),
            "a tripped meter stays tripped"
        );
    }

    #[test]
    fn an_unwired_meter_charges_whole_messages() {
        let meter = WireMeter::unwired();
        meter.arm(Budget::new(2, 65_536, 4096), 1 << 16);
        let t0 = Instant::now();
        assert!(meter.admit_message(t0, 10));
        assert!(meter.admit_message(t0, 10));
        assert!(!meter.admit_message(t0, 10));
        let wired = WireMeter::wired();
        wired.arm(Budget::new(2, 65_536, 4096), 1 << 16);
        assert!((0..10).all(|_| wired.admit_message(t0, 10)));
    }

    /// A million random frame streams, cut into random chunks: the scanner
    /// never panics, and whenever it accepts a stream it saw exactly the
    /// frames the stream holds.
    #[test]
    fn a_million_random_streams_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x0070_696e_6761_7070);
        let mut accepted = 0u32;
        for case in 0..1_000_000u32 {
            let mut stream = Vec::new();
            let mut expected = 0usize;
            for _ in 0..rng.random_range(1..6) {
                if rng.random_bool(0.15) {
                    // Noise: random bytes, maybe a header, maybe not.
                    let n = rng.random_range(1..12);
                    stream.extend((0..n).map(|_| rng.random::<u8>()));
                    expected = usize::MAX;
                } else {
                    let b0 = [0x00, 0x01, 0x02, 0x80, 0x81, 0x82, 0x88, 0x89, 0x8a]
                        [rng.random_range(0..9)];
                    let len = if b0 >= 0x88 {
                        rng.random_range(0..126)
                    } else if rng.random_ratio(1, 2000) {
                        [65_535, 65_536][rng.random_range(0..2)]
                    } else {
                        [0, 1, 125, 126, 127, 300][rng.random_range(0..6)]
                    };
                    stream.extend(frame(b0, &vec![0x20; len]));
                    expected = expected.saturating_add(1);
                }
            }
            let chunk = rng.random_range(1..64);
            let result = headers(&stream, chunk);
            if expected != usize::MAX {
                let seen =
                    result.unwrap_or_else(|e| panic!("case {case}: valid frames refused: {e:?}"));
                assert_eq!(seen.len(), expected, "case {case}");
                accepted += 1;
            }
        }
        assert!(accepted > 500_000, "only {accepted} valid streams accepted");
    }

    /// A socket that takes nothing yet: the writer's bytes wait in the
    /// spill up to its bound, then the writer waits; the reader gets every
    /// byte in order; once written out the spill holds no memory.
    #[tokio::test]
    async fn writes_spill_up_to_the_bound_in_order_and_release_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(1024);
        let mut w = Metered::new(near, WireMeter::unwired());
        let data: Vec<u8> = (0..3 * MAX_SPILL_BYTES).map(|i| (i % 251) as u8).collect();
        // 1 KiB goes to the pipe, then the spill fills: a write of a
        // chunk that does not fit waits.
        let chunk = 4096;
        let mut sent = 0;
        loop {
            let end = (sent + chunk).min(data.len());
            let step = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                w.write(&data[sent..end]),
            )
            .await;
            match step {
                Ok(n) => sent += n.expect("write"),
                Err(_) => break,
            }
        }
        assert!(sent <= 1024 + MAX_SPILL_BYTES, "bounded: {sent}");
        assert!(sent >= MAX_SPILL_BYTES, "the spill took what fits: {sent}");
        assert!(!w.spill.is_empty());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.map(|_| got)
        });
        w.write_all(&data[sent..]).await.expect("the rest");
        w.flush().await.expect("flush");
        assert_eq!(w.spill.capacity(), 0, "released once written out");
        w.shutdown().await.expect("shutdown");
        drop(w);
        let got = reader.await.expect("reader").expect("read");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "every byte, in order");
    }
}
