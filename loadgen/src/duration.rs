//! Human duration strings for `--duration`: `500ms`, `10s`, `2m`, `1h`,
//! fractions (`1.5s`) and sums (`1m30s`).

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDurationError {
    /// The string was empty.
    #[error("empty duration (use e.g. 500ms, 10s, 2m)")]
    Empty,
    /// A number was expected where the string has something else.
    #[error("expected a number in {0:?} (use e.g. 500ms, 10s, 2m)")]
    Number(String),
    /// A number had no unit after it.
    #[error("missing unit after {0:?} (use ms, s, m or h)")]
    MissingUnit(String),
    /// The unit is not one of `ms`, `s`, `m`, `h`.
    #[error("unknown unit {0:?} (use ms, s, m or h)")]
    Unit(String),
    /// The value does not fit a [`Duration`].
    #[error("duration out of range")]
    Range,
}

/// Parses a duration such as `500ms`, `10s`, `2m`, `1.5h` or `1m30s`.
///
/// # Errors
///
/// Returns a [`ParseDurationError`] naming what is wrong; a bare number
/// without a unit is rejected rather than guessed.
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(ParseDurationError::Empty);
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number_text = &rest[..number_len];
        let number: f64 = number_text
            .parse()
            .map_err(|_| ParseDurationError::Number(rest.to_owned()))?;
        rest = rest[number_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let seconds = match unit {
            "ms" => number / 1000.0,
            "s" | "sec" | "secs" => number,
            "m" | "min" | "mins" => number * 60.0,
            "h" | "hr" | "hrs" => number * 3600.0,
            "" => return Err(ParseDurationError::MissingUnit(number_text.to_owned())),
            other => return Err(ParseDurationError::Unit(other.to_owned())),
        };
        let part = Duration::try_from_secs_f64(seconds).map_err(|_| ParseDurationError::Range)?;
        total = total.checked_add(part).ok_or(ParseDurationError::Range)?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3min"), Ok(Duration::from_secs(180)));
    }

    #[test]
    fn parses_fractions_sums_and_spaces() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration(" 1m 500ms "),
            Ok(Duration::from_millis(60_500))
        );
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_malformed_input() {
        assert_eq!(parse_duration(""), Err(ParseDurationError::Empty));
        assert_eq!(
            parse_duration("10"),
            Err(ParseDurationError::MissingUnit("10".into()))
        );
        assert_eq!(
            parse_duration("10x"),
            Err(ParseDurationError::Unit("x".into()))
        );
        assert!(matches!(
            parse_duration("s"),
            Err(ParseDurationError::Number(_))
        ));
        assert!(matches!(
            parse_duration("-1s"),
            Err(ParseDurationError::Number(_))
        ));
        assert!(matches!(
            parse_duration("1.2.3s"),
            Err(ParseDurationError::Number(_))
        ));
        assert_eq!(
            parse_duration("99999999999999999999h"),
            Err(ParseDurationError::Range)
        );
    }
}
