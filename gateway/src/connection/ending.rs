//! Why a connection ends, and the close frame each reason sends.

use services::protocol::close_code;

/// Why a connection ended: each reason is one close code and reason text
/// (docs/protocol.md lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ending {
    /// The client sent a close frame.
    #[error("the client closed the connection")]
    ClientClosed,
    /// The connection broke, or the client stopped taking data.
    #[error("the connection was lost")]
    Lost,
    /// Nothing arrived for the idle timeout.
    #[error("idle timeout")]
    Idle,
    /// A frame over the size limit.
    #[error("frame too large")]
    TooBig,
    /// More messages per second than allowed.
    #[error("too many messages")]
    TooFast,
    /// A frame that breaks the WebSocket protocol.
    #[error("protocol error")]
    Protocol,
    /// A text frame that is not UTF-8.
    #[error("invalid UTF-8")]
    BadUtf8,
    /// The gateway is draining.
    #[error("service restart")]
    Restart,
    /// The client's outbound queue overflowed.
    #[error("too slow: outbound queue overflowed")]
    TooSlow,
}

impl Ending {
    /// The close code sent.
    pub fn code(self) -> u16 {
        match self {
            Ending::ClientClosed => close_code::NORMAL,
            Ending::Lost | Ending::Idle => close_code::GOING_AWAY,
            Ending::TooBig => close_code::TOO_BIG,
            Ending::TooFast => close_code::POLICY,
            Ending::Protocol => close_code::PROTOCOL_ERROR,
            Ending::BadUtf8 => close_code::INVALID_DATA,
            Ending::Restart => close_code::RESTART,
            Ending::TooSlow => close_code::TRY_AGAIN_LATER,
        }
    }

    /// The reason text sent with the close code.
    pub fn reason(self) -> &'static str {
        match self {
            Ending::ClientClosed | Ending::Lost => "",
            Ending::Idle => "idle timeout",
            Ending::TooBig => "frame too large",
            Ending::TooFast => "too many messages",
            Ending::Protocol => "protocol error",
            Ending::BadUtf8 => "invalid UTF-8",
            Ending::Restart => "service restart",
            Ending::TooSlow => "too slow: outbound queue overflowed",
        }
    }

    /// The reason behind an error reading from the socket, by the
    /// WebSocket library's error type (never its text).
    pub fn from_ws_error(e: axum::Error) -> Self {
        use tungstenite::Error;
        match e.into_inner().downcast::<Error>().map(|e| *e) {
            Ok(Error::Capacity(_)) => Ending::TooBig,
            Ok(Error::Utf8(_)) => Ending::BadUtf8,
            Ok(Error::Protocol(_)) => Ending::Protocol,
            _ => Ending::Lost,
        }
    }

    /// Why the stop signal of a connection fired: the gateway drains (its
    /// shutdown token is cancelled), or else the client fell behind.
    pub fn stopped(draining: bool) -> Self {
        if draining {
            Ending::Restart
        } else {
            Ending::TooSlow
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::error::{CapacityError, ProtocolError};

    fn from(e: tungstenite::Error) -> Ending {
        Ending::from_ws_error(axum::Error::new(e))
    }

    #[test]
    fn socket_errors_map_to_close_codes_by_type() {
        let too_long = CapacityError::MessageTooLong {
            size: 10,
            max_size: 5,
        };
        assert_eq!(from(tungstenite::Error::Capacity(too_long)).code(), 1009);
        assert_eq!(
            from(tungstenite::Error::Protocol(
                ProtocolError::NonZeroReservedBits
            ))
            .code(),
            1002
        );
        assert_eq!(from(tungstenite::Error::Utf8("x".into())).code(), 1007);
        assert_eq!(from(tungstenite::Error::ConnectionClosed), Ending::Lost);
        assert_eq!(
            Ending::from_ws_error(axum::Error::new(std::io::Error::other("x"))),
            Ending::Lost
        );
    }

    #[test]
    fn every_ending_has_its_documented_code() {
        let codes: Vec<(u16, &str)> = [
            Ending::ClientClosed,
            Ending::Lost,
            Ending::Idle,
            Ending::TooBig,
            Ending::TooFast,
            Ending::Restart,
            Ending::TooSlow,
        ]
        .into_iter()
        .map(|e| (e.code(), e.reason()))
        .collect();
        assert_eq!(
            codes,
            [
                (1000, ""),
                (1001, ""),
                (1001, "idle timeout"),
                (1009, "frame too large"),
                (1008, "too many messages"),
                (1012, "service restart"),
                (1013, "too slow: outbound queue overflowed"),
            ]
        );
        assert_eq!(Ending::stopped(true), Ending::Restart);
        assert_eq!(Ending::stopped(false), Ending::TooSlow);
    }
}
