//! Handle states and the one table of which call is allowed in which state (as libnbd).

use crate::errno::Errno;
use crate::error::Error;

/// The state of a handle, as libnbd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Newly created; not connected.
    Created,
    /// Connecting or handshaking.
    Connecting,
    /// In option negotiation (opt mode).
    Negotiating,
    /// Connected; no command in flight.
    Ready,
    /// Connected; commands in flight.
    Processing,
    /// The connection failed; only getters and close work.
    Dead,
    /// Shut down or closed.
    Closed,
}

impl State {
    /// The name JavaScript sees.
    pub fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Connecting => "connecting",
            State::Negotiating => "negotiating",
            State::Ready => "ready",
            State::Processing => "processing",
            State::Dead => "dead",
            State::Closed => "closed",
        }
    }
}

/// Kinds of call, grouped by the states they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `connect*`: only a newly created handle.
    Connect,
    /// Settings that shape the handshake (`setTls…`, `setRequest…`, `setHandshakeFlags`).
    Configure,
    /// `setExportName` and the settings that option mode may change between requests
    /// (`addMetaContext`, `setFullInfo`, `setRequestBlockSize`, …): before connecting or
    /// while negotiating.
    SetExportName,
    /// `opt*` requests: only while negotiating (option mode).
    Opt,
    /// Data commands (`pread`, `pwrite`, …).
    Command,
    /// Information getters (`getSize`, `can*`, …): once the server has told.
    Info,
    /// `shutdown`.
    Shutdown,
}

/// Allowed states per call: the single source of truth.
const ALLOWED: &[(Call, &[State], &str)] = &[
    (Call::Connect, &[State::Created], "newly created"),
    (Call::Configure, &[State::Created], "newly created"),
    (
        Call::SetExportName,
        &[State::Created, State::Negotiating],
        "newly created or negotiating",
    ),
    (Call::Opt, &[State::Negotiating], "negotiating (option mode)"),
    (
        Call::Command,
        &[State::Ready, State::Processing],
        "connected with the server",
    ),
    // Not `Dead` (libnbd's rule): what a connection that failed had negotiated is no
    // longer a fact about any server.
    (
        Call::Info,
        &[
            State::Negotiating,
            State::Ready,
            State::Processing,
            State::Closed,
        ],
        "negotiating, or connected with the server, or shut down",
    ),
    (
        Call::Shutdown,
        &[State::Negotiating, State::Ready, State::Processing],
        "negotiating or connected with the server",
    ),
];

/// Refuses `call` in `state` with libnbd's rule: `ENOTCONN` on a newly created handle,
/// `EINVAL` otherwise.
pub fn ensure_allowed(call: Call, state: State) -> Result<(), Error> {
    let (_, states, wanted) = ALLOWED
        .iter()
        .find(|(c, _, _)| *c == call)
        .expect("every call has a row");
    if states.contains(&state) {
        return Ok(());
    }
    let errno = if state == State::Created {
        Errno::ENOTCONN
    } else {
        Errno::EINVAL
    };
    Err(Error::usage(
        errno,
        format!("invalid state: {}: the handle must be {wanted}", state.name()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_handles_refuse_commands_with_enotconn() {
        let e = ensure_allowed(Call::Command, State::Created).unwrap_err();
        assert_eq!(e.errno(), Errno::ENOTCONN);
        assert!(e.message().contains("created"));
    }

    #[test]
    fn other_states_refuse_with_einval() {
        for s in [State::Dead, State::Closed, State::Connecting, State::Negotiating] {
            assert_eq!(ensure_allowed(Call::Command, s).unwrap_err().errno(), Errno::EINVAL);
        }
        assert_eq!(ensure_allowed(Call::Connect, State::Ready).unwrap_err().errno(), Errno::EINVAL);
    }

    #[test]
    fn getters_refuse_a_dead_handle() {
        let e = ensure_allowed(Call::Info, State::Dead).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert!(e.message().contains("dead"), "{}", e.message());
    }

    #[test]
    fn allowed_pairs_pass() {
        ensure_allowed(Call::Command, State::Processing).unwrap();
        ensure_allowed(Call::Info, State::Closed).unwrap();
        ensure_allowed(Call::SetExportName, State::Negotiating).unwrap();
    }
}
