//! Why a credential has no fresh token: the `reason` of 503 bodies, of
//! `/credentials`, of `token_refresh` log events and of dead marks in the
//! store; and how a refresh attempt ended (`outcome`). Each has an entry
//! in docs/troubleshooting.md and in `explain`.

/// The engine's own reasons, or the OAuth `error` code the IdP answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Backoff,
    LostRotation,
    /// A lost rotation that introspection could not settle.
    LostRotationUnverified,
    /// The token set was moved to another store.
    Migrated,
    NoRefreshToken,
    NoToken,
    RefreshInFlightElsewhere,
    RefreshTimeout,
    SeedAlreadyUsed,
    ShuttingDown,
    StoreChanged,
    StoreRolledBack,
    StoreUnavailable,
    StoreWriteFailed,
    TokenNotAHeader,
    /// The route's upstream comes from a token-response value
    /// (`{token.instance_url}`) that no valid response has sent yet.
    TokenFieldMissing,
    /// The IdP issued a `token_type` this credential does not inject.
    TokenTypeUnsupported,
    /// A failure without an OAuth code, named after its outcome.
    Unexplained(Outcome),
    /// The IdP's OAuth `error` code (sanitized), e.g. `invalid_grant`.
    Idp(String),
}

impl Reason {
    /// Every reason the engine makes itself (not the IdP's codes).
    pub const ENGINE: [Reason; 17] = [
        Reason::Backoff,
        Reason::LostRotation,
        Reason::LostRotationUnverified,
        Reason::Migrated,
        Reason::NoRefreshToken,
        Reason::NoToken,
        Reason::RefreshInFlightElsewhere,
        Reason::RefreshTimeout,
        Reason::SeedAlreadyUsed,
        Reason::ShuttingDown,
        Reason::StoreChanged,
        Reason::StoreRolledBack,
        Reason::StoreUnavailable,
        Reason::StoreWriteFailed,
        Reason::TokenNotAHeader,
        Reason::TokenFieldMissing,
        Reason::TokenTypeUnsupported,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            Reason::Backoff => "backoff",
            Reason::LostRotation => "lost_rotation",
            Reason::LostRotationUnverified => "lost_rotation_unverified",
            Reason::Migrated => "migrated",
            Reason::NoRefreshToken => "no_refresh_token",
            Reason::NoToken => "no_token",
            Reason::RefreshInFlightElsewhere => "refresh_in_flight_elsewhere",
            Reason::RefreshTimeout => "refresh_timeout",
            Reason::SeedAlreadyUsed => "seed_already_used",
            Reason::ShuttingDown => "shutting_down",
            Reason::StoreChanged => "store_changed",
            Reason::StoreRolledBack => "store_rolled_back",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::StoreWriteFailed => "store_write_failed",
            Reason::TokenNotAHeader => "token_not_a_header",
            Reason::TokenFieldMissing => "token_field_missing",
            Reason::TokenTypeUnsupported => "token_type_unsupported",
            Reason::Unexplained(o) => o.as_str(),
            Reason::Idp(code) => code,
        }
    }

    /// Reads a reason back (a dead mark in the store); anything not the
    /// engine's own is taken as the IdP's code.
    pub fn parse(s: &str) -> Reason {
        Reason::ENGINE
            .into_iter()
            .find(|r| r.as_str() == s)
            .unwrap_or_else(|| Reason::Idp(s.to_owned()))
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How a refresh attempt ended: the `outcome` of the `token_refresh` log
/// event and of the metrics (docs/architecture.md, "Failure classes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    InvalidGrant,
    LostRotation,
    LostRace,
    ConfigError,
    Transient,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::InvalidGrant => "invalid_grant",
            Outcome::LostRotation => "lost_rotation",
            Outcome::LostRace => "lost_race",
            Outcome::ConfigError => "config_error",
            Outcome::Transient => "transient",
        }
    }

    /// Dead outcomes stop refreshing until something changes.
    pub fn is_dead(self) -> bool {
        matches!(
            self,
            Outcome::InvalidGrant | Outcome::LostRotation | Outcome::ConfigError
        )
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_reasons_read_back_as_themselves() {
        for r in Reason::ENGINE {
            assert_eq!(Reason::parse(r.as_str()), r);
        }
        assert_eq!(
            Reason::parse("invalid_grant"),
            Reason::Idp("invalid_grant".into())
        );
    }
}
