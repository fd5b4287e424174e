//! Whether a service's NATS connection held between two looks. A service that judges others by
//! their silence (the registry's liveness, the scheduler's reconciler) counts no silence over a
//! break of its own connection: what it could not hear is no evidence against anyone.

use std::sync::atomic::Ordering;

/// How the connection broke since the last look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsBreak {
    /// Not connected now.
    Disconnected,
    /// Connected again since the last look.
    Reconnected,
}

/// The connections a client had made (its first included) at the last look.
#[derive(Debug, Clone)]
pub struct NatsContinuity {
    connects: u64,
}

impl NatsContinuity {
    pub fn start(nats: &async_nats::Client) -> Self {
        Self {
            connects: connects(nats),
        }
    }

    /// What broke since the last look, if anything.
    pub fn look(&mut self, nats: &async_nats::Client) -> Option<NatsBreak> {
        let connects = connects(nats);
        let reconnected = connects != self.connects;
        self.connects = connects;
        if nats.connection_state() != async_nats::connection::State::Connected {
            Some(NatsBreak::Disconnected)
        } else if reconnected {
            Some(NatsBreak::Reconnected)
        } else {
            None
        }
    }
}

fn connects(nats: &async_nats::Client) -> u64 {
    nats.statistics().connects.load(Ordering::Relaxed)
}
