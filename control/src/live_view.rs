//! [`LiveView`]: the last known value of something kept in the control plane
//! (membership, the current leader, the placement), plus whether it is being kept up
//! to date right now.
//!
//! The value never goes back to empty because etcd went away: while disconnected a view
//! keeps what it last saw (DESIGN.md §4: etcd is never a single point of failure for
//! serving) and its [`ConnectionState`] says so.

use tokio::sync::watch;

/// Whether a view (or a registration) is in touch with its source of truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not yet synchronised once.
    Connecting,
    /// Synchronised and following changes.
    Connected,
    /// Lost touch; the value is the last one seen. Reconnecting with backoff.
    Disconnected,
}

/// A value that a background task keeps current. Cheap to clone; the task stops once
/// the last view and the last receiver taken from one are dropped.
#[derive(Debug)]
pub struct LiveView<T> {
    value: watch::Receiver<T>,
    connection: watch::Receiver<ConnectionState>,
}

impl<T> Clone for LiveView<T> {
    fn clone(&self) -> Self {
        Self {
            value: self.value.clone(),
            connection: self.connection.clone(),
        }
    }
}

impl<T: Clone> LiveView<T> {
    pub(crate) fn new(
        value: watch::Receiver<T>,
        connection: watch::Receiver<ConnectionState>,
    ) -> Self {
        Self { value, connection }
    }

    /// The value now.
    pub fn current(&self) -> T {
        self.value.borrow().clone()
    }

    /// A receiver of the value; it keeps the feeding task alive on its own.
    pub fn subscribe(&self) -> watch::Receiver<T> {
        self.value.clone()
    }

    /// A receiver of the connection state.
    pub fn connection(&self) -> watch::Receiver<ConnectionState> {
        self.connection.clone()
    }

    /// True while the value is being kept current.
    pub fn is_connected(&self) -> bool {
        *self.connection.borrow() == ConnectionState::Connected
    }
}
