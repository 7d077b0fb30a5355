//! The scheduler's decisions, as plain state: which request is admitted (within the
//! running-batch limit, and what to do when the KV cache has no room), which sequences
//! the next step runs and with how many tokens each (decode first, then prefill chunks
//! in admission order, within the step's token budget), and which sequences a step's
//! results end. No threads, channels or clocks: the engine loop moves requests in and
//! events out, and calls the model; everything it decides is here and unit-tested.

/// What the batch needs to know of a sequence.
pub trait Scheduled {
    /// Prompt tokens not prefilled yet (0: the sequence decodes one token per step).
    fn prompt_remaining(&self) -> usize;
}

/// The limits the decisions keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tokens per step (decode tokens plus prefill chunks); at least 1 is used.
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running: usize,
}

/// What to do with a request whose KV cache reservation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheFull {
    /// Others are running and will free blocks: keep it at the head of the queue.
    Wait,
    /// Nothing else holds the cache: it cannot fit even alone; refuse it.
    Refuse,
}

/// One member of a planned step: the sequence at `index` of [`Batch::running`] runs a
/// chunk of at most `budget` tokens (what `Sequence::next_chunk` is given).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub index: usize,
    pub budget: usize,
}

/// How a step ended for one of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still running (a prefill chunk, or a token that did not stop it).
    Continue,
    /// Finished: a stop condition, the length limit, its client went away, or it failed.
    End,
}

/// The running batch, in admission order.
#[derive(Debug)]
pub struct Batch<T> {
    limits: Limits,
    running: Vec<Admitted<T>>,
    next_order: u64,
}

#[derive(Debug)]
struct Admitted<T> {
    order: u64,
    item: T,
}

impl<T: Scheduled> Batch<T> {
    pub fn new(limits: Limits) -> Self {
        Batch {
            limits,
            running: Vec::new(),
            next_order: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether the running batch has room for one more sequence.
    pub fn has_room(&self) -> bool {
        self.running.len() < self.limits.max_running
    }

    /// What to do with a request whose cache reservation failed.
    pub fn on_cache_full(&self) -> CacheFull {
        if self.running.is_empty() {
            CacheFull::Refuse
        } else {
            CacheFull::Wait
        }
    }

    /// Admits a sequence (the caller checked [`Batch::has_room`]).
    pub fn admit(&mut self, item: T) {
        let order = self.next_order;
        self.next_order += 1;
        self.running.push(Admitted { order, item });
    }

    /// The sequences of the next step and each one's token budget: every decoding
    /// sequence (one token each), then prefilling ones in admission order, each taking
    /// what is left of the step's budget; the rest wait for a later step. Reorders
    /// [`Batch::running`] so the plan's indices are in step order.
    pub fn plan(&mut self) -> Vec<Planned> {
        self.running
            .sort_by_key(|a| (a.item.prompt_remaining() > 0, a.order));
        let mut budget = self.limits.max_batch_tokens.max(1);
        let mut plan = Vec::new();
        for (index, a) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            plan.push(Planned { index, budget });
            let remaining = a.item.prompt_remaining();
            let takes = if remaining > 0 {
                remaining.min(budget)
            } else {
                1
            };
            budget = budget.saturating_sub(takes);
        }
        plan
    }

    /// The running sequences, in the order of the last [`Batch::plan`].
    pub fn running(&self) -> impl Iterator<Item = &T> {
        self.running.iter().map(|a| &a.item)
    }

    /// The running sequences, mutably, in the order of the last [`Batch::plan`].
    pub fn running_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.running.iter_mut().map(|a| &mut a.item)
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        self.running.get(index).map(|a| &a.item)
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.running.get_mut(index).map(|a| &mut a.item)
    }

    /// Applies a step's results: `outcomes` pairs indices of the plan with how the step
    /// ended for them; the ended ones leave the batch and are returned (in step order).
    pub fn apply(&mut self, outcomes: &[(usize, Outcome)]) -> Vec<T> {
        let mut ended: Vec<usize> = outcomes
            .iter()
            .filter(|(_, o)| *o == Outcome::End)
            .map(|(i, _)| *i)
            .filter(|i| *i < self.running.len())
            .collect();
        ended.sort_unstable();
        ended.dedup();
        let mut out: Vec<T> = ended
            .into_iter()
            .rev()
            .map(|i| self.running.remove(i).item)
            .collect();
        out.reverse();
        out
    }

    /// Removes the sequences `cancelled` says are (e.g. whose client went away) and
    /// returns them, freeing their cache when dropped.
    pub fn cancel_where(&mut self, mut cancelled: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        let mut kept = Vec::with_capacity(self.running.len());
        for a in self.running.drain(..) {
            if cancelled(&a.item) {
                out.push(a.item);
            } else {
                kept.push(a);
            }
        }
        self.running = kept;
        out
    }

    /// Empties the batch (the engine stopped), returning every sequence.
    pub fn take_all(&mut self) -> Vec<T> {
        self.running.drain(..).map(|a| a.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence with a name and prompt tokens left to prefill.
    #[derive(Debug, Clone, PartialEq)]
    struct Fake {
        name: &'static str,
        prompt: usize,
    }

    impl Scheduled for Fake {
        fn prompt_remaining(&self) -> usize {
            self.prompt
        }
    }

    fn fake(name: &'static str, prompt: usize) -> Fake {
        Fake { name, prompt }
    }

    fn batch(max_batch_tokens: usize, max_running: usize) -> Batch<Fake> {
        Batch::new(Limits {
            max_batch_tokens,
            max_running,
        })
    }

    fn names(b: &Batch<Fake>, plan: &[Planned]) -> Vec<(&'static str, usize)> {
        plan.iter()
            .map(|p| (b.get(p.index).map_or("?", |f| f.name), p.budget))
            .collect()
    }

    /// Runs the plan as `Sequence::next_chunk` would: a prefill chunk consumes up to
    /// its budget of the prompt.
    fn run_plan(b: &mut Batch<Fake>, plan: &[Planned]) {
        for p in plan {
            if let Some(f) = b.get_mut(p.index) {
                f.prompt -= f.prompt.min(p.budget.max(1));
            }
        }
    }

    #[test]
    fn admission_stops_at_max_running() {
        let mut b = batch(64, 2);
        assert!(b.has_room());
        b.admit(fake("a", 3));
        assert!(b.has_room());
        b.admit(fake("b", 3));
        assert!(!b.has_room(), "two running of at most two");
        assert_eq!(b.len(), 2);
        b.apply(&[(0, Outcome::End)]);
        assert!(b.has_room(), "a finished sequence frees its place");
    }

    #[test]
    fn a_full_cache_waits_behind_running_sequences_and_refuses_when_alone() {
        let mut b = batch(64, 4);
        assert_eq!(b.on_cache_full(), CacheFull::Refuse);
        b.admit(fake("a", 0));
        assert_eq!(b.on_cache_full(), CacheFull::Wait);
    }

    #[test]
    fn decoding_sequences_go_first_then_prefills_in_admission_order() {
        let mut b = batch(10, 8);
        b.admit(fake("p1", 6));
        b.admit(fake("d1", 0));
        b.admit(fake("p2", 6));
        b.admit(fake("d2", 0));
        let plan = b.plan();
        // Two decode tokens, then p1 takes 6 of the 8 left, p2 the last 2.
        assert_eq!(
            names(&b, &plan),
            vec![("d1", 10), ("d2", 9), ("p1", 8), ("p2", 2)]
        );
    }

    #[test]
    fn a_spent_budget_leaves_later_prefills_for_the_next_step() {
        let mut b = batch(4, 8);
        b.admit(fake("old", 5));
        b.admit(fake("new", 3));
        let plan = b.plan();
        assert_eq!(names(&b, &plan), vec![("old", 4)], "the older prompt first");
        run_plan(&mut b, &plan);
        let plan = b.plan();
        // The older prompt finishes its last token before the newer one starts.
        assert_eq!(names(&b, &plan), vec![("old", 4), ("new", 3)]);
        run_plan(&mut b, &plan);
        assert!(b.running().all(|f| f.prompt == 0));
        let plan = b.plan();
        assert_eq!(names(&b, &plan), vec![("old", 4), ("new", 3)]);
    }

    #[test]
    fn every_decoding_sequence_gets_a_token_even_when_the_budget_is_small() {
        let mut b = batch(2, 8);
        for n in ["a", "b", "c"] {
            b.admit(fake(n, 0));
        }
        let plan = b.plan();
        assert_eq!(names(&b, &plan), vec![("a", 2), ("b", 1)]);
        // A zero budget still runs one token a step.
        let mut b = batch(0, 8);
        b.admit(fake("a", 5));
        let plan = b.plan();
        assert_eq!(names(&b, &plan), vec![("a", 1)]);
    }

    #[test]
    fn applying_results_removes_only_the_ended_sequences() {
        let mut b = batch(16, 8);
        for n in ["a", "b", "c", "d"] {
            b.admit(fake(n, 0));
        }
        let plan = b.plan();
        assert_eq!(plan.len(), 4);
        let ended = b.apply(&[
            (0, Outcome::Continue),
            (1, Outcome::End),
            (2, Outcome::Continue),
            (3, Outcome::End),
        ]);
        assert_eq!(
            ended.iter().map(|f| f.name).collect::<Vec<_>>(),
            vec!["b", "d"]
        );
        assert_eq!(
            b.running().map(|f| f.name).collect::<Vec<_>>(),
            vec!["a", "c"]
        );
        // Out-of-range or repeated indices remove nothing else.
        assert!(b.apply(&[(7, Outcome::End)]).is_empty());
        assert_eq!(b.apply(&[(0, Outcome::End), (0, Outcome::End)]).len(), 1);
        assert_eq!(b.running().map(|f| f.name).collect::<Vec<_>>(), vec!["c"]);
    }

    #[test]
    fn cancelled_sequences_leave_and_the_rest_keep_their_order() {
        let mut b = batch(16, 8);
        for n in ["a", "b", "c"] {
            b.admit(fake(n, 2));
        }
        let gone = b.cancel_where(|f| f.name == "b");
        assert_eq!(gone, vec![fake("b", 2)]);
        let plan = b.plan();
        assert_eq!(
            names(&b, &plan),
            vec![("a", 16), ("c", 14)],
            "admission order survives a cancellation"
        );
        assert_eq!(b.take_all().len(), 2);
        assert!(b.is_empty());
    }
}
