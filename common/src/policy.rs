//! The typed values of a service's traffic policy, and the rules every
//! source of policy checks alike: `meshctl policy`, the control plane's
//! state, discovery updates and the proxy's config file.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a service's endpoints speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    H2,
    Grpc,
    Tcp,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [Protocol::Http, Protocol::H2, Protocol::Grpc, Protocol::Tcp];

    /// Whether the proxy speaks HTTP/2 to this service's endpoints.
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::H2 | Protocol::Grpc)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::H2 => "h2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

/// How a proxy reaches a service's peer sidecars: mTLS over TCP (HTTP/2),
/// or QUIC (HTTP/3, the same mTLS), falling back to TCP for a peer whose
/// UDP does not get through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Quic,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Tcp, Transport::Quic];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        }
    }
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        parse_named("transport", text, &Transport::ALL, Transport::as_str)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Conditions that make a response worth another try. Connect failures are
/// always retried, whatever the list says, because the request never left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    ConnectFailure,
    /// Any 5xx status.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 and 504 only.
    GatewayError,
    /// gRPC status UNAVAILABLE in the response headers.
    Unavailable,
}

impl RetryOn {
    pub const ALL: [RetryOn; 4] =
        [RetryOn::ConnectFailure, RetryOn::ServerError, RetryOn::GatewayError, RetryOn::Unavailable];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::ServerError => "5xx",
            RetryOn::GatewayError => "gateway-error",
            RetryOn::Unavailable => "unavailable",
        }
    }
}

/// Parses one of `all` by its name, or says which names there are.
fn parse_named<T: Copy>(
    what: &str,
    text: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, String> {
    all.iter().copied().find(|value| name(*value) == text).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|value| name(*value)).collect();
        format!("{what} {text:?} is not one of {}", names.join(", "))
    })
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        parse_named("protocol", text, &Protocol::ALL, Protocol::as_str)
    }
}

impl FromStr for RetryOn {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        parse_named("retry condition", text, &RetryOn::ALL, RetryOn::as_str)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tries in all, the first included.
pub const RETRY_ATTEMPTS: RangeInclusive<u32> = 1..=10;

/// Whether `attempts` is a valid number of tries.
pub fn check_retry_attempts(attempts: u32) -> Result<(), String> {
    if RETRY_ATTEMPTS.contains(&attempts) {
        Ok(())
    } else {
        Err(format!(
            "must be from {} to {} (tries in all, the first included), got {attempts}",
            RETRY_ATTEMPTS.start(),
            RETRY_ATTEMPTS.end()
        ))
    }
}

/// Whether `ratio` is a valid retry budget: retries per request.
pub fn check_budget_ratio(ratio: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&ratio) {
        Ok(())
    } else {
        Err(format!("must be from 0 to 1, got {ratio}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_their_values() {
        for protocol in Protocol::ALL {
            assert_eq!(protocol.as_str().parse::<Protocol>(), Ok(protocol));
        }
        for condition in RetryOn::ALL {
            assert_eq!(condition.as_str().parse::<RetryOn>(), Ok(condition));
        }
        assert_eq!(
            "smtp".parse::<Protocol>(),
            Err("protocol \"smtp\" is not one of http, h2, grpc, tcp".into())
        );
        assert!("4xx"
            .parse::<RetryOn>()
            .unwrap_err()
            .contains("connect-failure, 5xx, gateway-error, unavailable"));
    }

    #[test]
    fn serde_names_match_the_command_line_names() {
        #[derive(Deserialize)]
        struct Holder {
            protocol: Protocol,
            on: Vec<RetryOn>,
        }
        for protocol in Protocol::ALL {
            for condition in RetryOn::ALL {
                let text = format!("protocol = \"{protocol}\"\non = [\"{condition}\"]\n");
                let holder: Holder = toml::from_str(&text).unwrap();
                assert_eq!((holder.protocol, holder.on), (protocol, vec![condition]));
            }
        }
    }

    #[test]
    fn limits_are_checked_alike_everywhere() {
        // (attempts, valid)
        for (attempts, valid) in [(0, false), (1, true), (10, true), (11, false)] {
            assert_eq!(check_retry_attempts(attempts).is_ok(), valid, "{attempts}");
        }
        for (ratio, valid) in [(-0.1, false), (0.0, true), (1.0, true), (1.5, false)] {
            assert_eq!(check_budget_ratio(ratio).is_ok(), valid, "{ratio}");
        }
    }
}
