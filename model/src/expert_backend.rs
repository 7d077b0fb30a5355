//! The seam between the model and whatever computes its routed experts: the model hands
//! a MoE layer's rows with their top-k expert ids and weights to an [`ExpertBackend`]
//! and gets back the weighted sums. [`crate::LocalExperts`] computes in process; the
//! router plugs in remote workers and device actors. A leaf module: it depends on
//! nothing else of the crate, so errors, experts and the model can all use it.
//!
//! A backend may also start a layer's call and let the caller compute meanwhile
//! ([`ExpertBackend::submit`] → [`Pending`]): the model then overlaps shared experts,
//! and the other micro-batch's attention, with the dispatch.

/// An expert slot that is not to be computed (a worker given part of a row's experts).
pub const NO_EXPERT: u32 = u32::MAX;

/// Why a MoE layer could not be computed. Each variant says what happened, so callers
/// decide (retry, fail over, give up) by variant, never by message text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpertError {
    /// This backend does not hold the expert.
    #[error("expert {expert} of layer {layer} is not hosted here")]
    NotHosted { layer: usize, expert: u32 },
    /// The request itself is malformed (sizes disagree, not a MoE layer).
    #[error("invalid expert request: {0}")]
    Invalid(String),
    /// `who` (a worker, a device, the local experts) gave no answer within `after`: it
    /// may be hung, overloaded or cut off.
    #[error("{who}: no response within {} ms", .after.as_millis())]
    Deadline {
        who: String,
        after: std::time::Duration,
    },
    /// `worker` answered, with an error.
    #[error("worker {worker}: {message} (code {code})")]
    Rejected {
        worker: String,
        code: RejectCode,
        message: String,
    },
    /// No connection to a worker, or its stream broke (or delivered what cannot be read).
    #[error("experts unreachable: {0}")]
    Transport(String),
    /// No live copy of some experts is left to ask (none routed, every one marked down,
    /// or held only by devices that are restarting).
    #[error("experts unavailable: {0}")]
    Unavailable(String),
}

/// Why a worker refused a dispatch: the `WorkerErrorCode` of its answer (`moe.v1`), as
/// the model sees it (this crate does not depend on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    /// The dispatch was malformed; sending it again cannot help.
    InvalidArgument,
    /// The worker does not host an expert the dispatch names (its placement moved on).
    NotHosted,
    /// A device of the worker failed, is restarting or did not answer in time.
    Unavailable,
    /// A code this build does not know (a newer worker), kept as it came.
    Other(i32),
}

impl RejectCode {
    /// Whether sending the same dispatch again (to this or another copy) may succeed.
    pub fn is_retryable(self) -> bool {
        !matches!(self, RejectCode::InvalidArgument)
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectCode::InvalidArgument => f.write_str("3, invalid argument"),
            RejectCode::NotHosted => f.write_str("5, not hosted"),
            RejectCode::Unavailable => f.write_str("14, unavailable"),
            RejectCode::Other(n) => write!(f, "{n}, unknown"),
        }
    }
}

/// One MoE layer's work for a step: `rows` is `[n, hidden]`, `expert_ids` and `weights`
/// are `[n, top_k]`.
#[derive(Debug, Clone, Copy)]
pub struct MoeRequest<'a> {
    pub layer: usize,
    pub hidden: usize,
    pub top_k: usize,
    pub rows: &'a [f32],
    pub expert_ids: &'a [u32],
    pub weights: &'a [f32],
}

impl MoeRequest<'_> {
    pub fn num_rows(&self) -> usize {
        self.rows.len().checked_div(self.hidden).unwrap_or(0)
    }

    /// Checks that the sizes agree, so a backend never indexes out of bounds.
    pub fn validate(&self) -> Result<(), ExpertError> {
        if self.hidden == 0 || !self.rows.len().is_multiple_of(self.hidden) {
            return Err(ExpertError::Invalid(format!(
                "{} values are not a whole number of rows of width {}",
                self.rows.len(),
                self.hidden
            )));
        }
        let n = self.rows.len() / self.hidden;
        if self.expert_ids.len() != n * self.top_k || self.weights.len() != n * self.top_k {
            return Err(ExpertError::Invalid(format!(
                "{n} rows with top_k {} need {} expert ids and weights, got {} and {}",
                self.top_k,
                n * self.top_k,
                self.expert_ids.len(),
                self.weights.len()
            )));
        }
        Ok(())
    }
}

/// Computes MoE layers: returns `[n, hidden]`, row i = Σ_k weights[i,k] · FFN_{ids[i,k]}(rows[i]).
pub trait ExpertBackend: Send + Sync {
    fn forward(&self, req: &MoeRequest<'_>) -> Result<Vec<f32>, ExpertError>;

    /// Called by the engine before each step with the W3C `traceparent` values of the
    /// step's requests that sent one; a remote backend passes them to the workers with
    /// every dispatch of the step. In-process backends ignore them.
    fn begin_step(&self, _traceparents: &[String]) {}

    /// Starts a layer's call and, where the backend can (remote workers), returns
    /// before the answer: the caller computes what does not depend on it, then waits.
    /// The default computes at once.
    fn submit(&self, batch: MoeBatch) -> Pending<'_> {
        Pending::done(self.forward(&batch.as_request()))
    }

    /// Into how many micro-batches the model should split a step of `seqs` sequences
    /// and `tokens` tokens, pipelined so that one's experts run while another's
    /// attention does. 1 (the default) where submitting does not overlap.
    fn micro_batches(&self, _seqs: usize, _tokens: usize) -> usize {
        1
    }
}

/// One MoE layer's work, owned: what [`ExpertBackend::submit`] takes, so that the call
/// may run on while the caller reuses its buffers.
#[derive(Debug, Clone)]
pub struct MoeBatch {
    pub layer: usize,
    pub hidden: usize,
    pub top_k: usize,
    pub rows: Vec<f32>,
    pub expert_ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl MoeBatch {
    /// The borrowed form every backend computes from.
    pub fn as_request(&self) -> MoeRequest<'_> {
        MoeRequest {
            layer: self.layer,
            hidden: self.hidden,
            top_k: self.top_k,
            rows: &self.rows,
            expert_ids: &self.expert_ids,
            weights: &self.weights,
        }
    }
}

/// A MoE layer's call in flight: [`wait`](Pending::wait) gives what
/// [`ExpertBackend::forward`] would have returned.
pub struct Pending<'a>(PendingState<'a>);

type Finish<'a> = Box<dyn FnOnce() -> Result<Vec<f32>, ExpertError> + 'a>;

enum PendingState<'a> {
    Done(Result<Vec<f32>, ExpertError>),
    Later(Finish<'a>),
}

impl<'a> Pending<'a> {
    /// A call already answered.
    pub fn done(result: Result<Vec<f32>, ExpertError>) -> Pending<'a> {
        Pending(PendingState::Done(result))
    }

    /// A call under way; `finish` blocks until its answer.
    pub fn later(finish: impl FnOnce() -> Result<Vec<f32>, ExpertError> + 'a) -> Pending<'a> {
        Pending(PendingState::Later(Box::new(finish)))
    }

    /// Blocks until the answer.
    pub fn wait(self) -> Result<Vec<f32>, ExpertError> {
        match self.0 {
            PendingState::Done(r) => r,
            PendingState::Later(f) => f(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_happened() {
        let deadline = ExpertError::Deadline {
            who: "worker 10.0.0.7:50051".into(),
            after: std::time::Duration::from_millis(1500),
        };
        assert_eq!(
            deadline.to_string(),
            "worker 10.0.0.7:50051: no response within 1500 ms"
        );
        let rejected = ExpertError::Rejected {
            worker: "w1:1".into(),
            code: RejectCode::NotHosted,
            message: "expert 3 of layer 1 is not hosted here".into(),
        };
        let m = rejected.to_string();
        assert!(
            m.contains("w1:1") && m.contains("expert 3 of layer 1"),
            "{m}"
        );
        assert!(m.contains("(code 5, not hosted)"), "{m}");
        let unknown = ExpertError::Rejected {
            worker: "w1:1".into(),
            code: RejectCode::Other(-7),
            message: "?".into(),
        };
        assert!(
            unknown.to_string().contains("code -7, unknown"),
            "{unknown}"
        );
    }

    #[test]
    fn only_an_invalid_argument_is_not_worth_retrying() {
        assert!(!RejectCode::InvalidArgument.is_retryable());
        for c in [
            RejectCode::NotHosted,
            RejectCode::Unavailable,
            RejectCode::Other(99),
        ] {
            assert!(c.is_retryable(), "{c}");
        }
    }
}
