//! Token sampling: turns one position's logits into the next token id.
//!
//! A [`Sampler`] is created per request. It validates the OpenAI-style
//! [`SamplingParams`], owns a small deterministic PRNG (so the same seed gives
//! the same tokens on every platform, independent of any external crate or
//! C library: even `exp` is computed here) and the token counts that the
//! repetition / presence / frequency penalties need.
//!
//! Pipeline for each call to [`Sampler::sample`]:
//! penalties (repetition, then presence/frequency) → greedy argmax if
//! `temperature == 0` → otherwise temperature → top_k → softmax → top_p →
//! min_p → renormalise → draw.
//!
//! The reported log-probabilities are always those of the *raw* model
//! distribution (log_softmax of the logits exactly as given), not of the
//! penalised / truncated distribution the token was drawn from. That is what
//! the OpenAI API reports, and it keeps logprobs comparable across requests
//! with different sampling settings.
//!
//! NaN logits are treated as `-inf` (never chosen) and `+inf` as `f32::MAX`
//! (so arithmetic like `inf - inf` cannot create NaNs further down).

use std::cmp::Ordering;
use std::collections::HashMap;

/// Largest `logprobs` value accepted (OpenAI's limit).
pub const MAX_LOGPROBS: u32 = 20;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is out of range; `field` is the request field name, e.g. "temperature".
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The model produced logits nothing can be drawn from (empty, or all NaN / -inf).
    /// Kept apart from `Invalid` because it is a server-side fault, not a bad request.
    #[error("unusable logits: {0}")]
    BadLogits(&'static str),
}

/// Penalties pushed every logit to -inf (only possible with extreme logits).
const ALL_MASKED: SamplingError = SamplingError::BadLogits("all logits are -inf after penalties");

fn invalid(field: &'static str, reason: String) -> SamplingError {
    SamplingError::Invalid { field, reason }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 => greedy (argmax). Must be finite and >= 0.
    pub temperature: f32,
    /// 0 => off (all tokens).
    pub top_k: u32,
    /// In (0, 1]; 1 => off.
    pub top_p: f32,
    /// In [0, 1]; 0 => off.
    pub min_p: f32,
    /// > 0 and finite; 1 => off. Hugging Face semantics over prompt and generated tokens.
    pub repetition_penalty: f32,
    /// In [-2, 2]; OpenAI semantics over generated tokens only.
    pub presence_penalty: f32,
    /// In [-2, 2]; OpenAI semantics over generated tokens only.
    pub frequency_penalty: f32,
    /// Same seed => same output.
    pub seed: Option<u64>,
    /// Some(n): also return the top-n alternatives; n <= [`MAX_LOGPROBS`].
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field; the error names the offending field.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let (t, r) = (self.temperature, self.repetition_penalty);
        let (top_p, min_p) = (self.top_p, self.min_p);
        let (pres, freq) = (self.presence_penalty, self.frequency_penalty);
        // Every condition is false for NaN (`contains` and comparisons both are), so NaN fails.
        let checks = [
            (
                t.is_finite() && t >= 0.0,
                "temperature",
                "finite and >= 0",
                t,
            ),
            (top_p > 0.0 && top_p <= 1.0, "top_p", "in (0, 1]", top_p),
            ((0.0..=1.0).contains(&min_p), "min_p", "in [0, 1]", min_p),
            (
                r.is_finite() && r > 0.0,
                "repetition_penalty",
                "finite and > 0",
                r,
            ),
            (
                (-2.0..=2.0).contains(&pres),
                "presence_penalty",
                "in [-2, 2]",
                pres,
            ),
            (
                (-2.0..=2.0).contains(&freq),
                "frequency_penalty",
                "in [-2, 2]",
                freq,
            ),
        ];
        for (ok, field, want, got) in checks {
            if !ok {
                return Err(invalid(field, format!("must be {want}, got {got}")));
            }
        }
        match self.logprobs {
            Some(n) if n > MAX_LOGPROBS => Err(invalid(
                "logprobs",
                format!("must be <= {MAX_LOGPROBS}, got {n}"),
            )),
            _ => Ok(()),
        }
    }
}

/// One chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    /// Log-probability of the chosen token under the RAW model distribution: log_softmax of the
    /// logits as given, before penalties, temperature, or truncation (see the module docs).
    pub logprob: f32,
    /// Top-n (token_id, logprob) under that same raw distribution, highest first, ties broken by
    /// lower token id; empty unless `params.logprobs` is Some. Tokens with probability zero
    /// (NaN / -inf logits) are never listed, so the list may be shorter than n.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// xoshiro256** seeded through splitmix64: tiny, fast, and fully specified, so the same seed
/// yields the same stream forever, on every platform.
#[derive(Debug, Clone)]
struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    fn from_seed(seed: u64) -> Self {
        // splitmix64 spreads nearby seeds (0, 1, 2...) into unrelated states and can never
        // produce the all-zero state that would lock xoshiro at zero.
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A token still in the running while sampling, with its (unnormalised) softmax weight.
#[derive(Debug, Clone, Copy)]
struct Cand {
    id: u32,
    logit: f32,
    weight: f32,
}

fn cand(id: usize, logit: f32, weight: f32) -> Cand {
    // `Sampler::sample` rejects vocabularies whose ids do not fit in u32.
    let id = id as u32;
    Cand { id, logit, weight }
}

/// Highest logit first, ties by lower id: a total order, so the candidates' order (and so which
/// token a given random number lands on) never depends on the sort algorithm used.
fn by_logit_desc(a: &Cand, b: &Cand) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Same idea by weight, for the nucleus search over weights.
fn by_weight_desc(a: &Cand, b: &Cand) -> Ordering {
    b.weight.total_cmp(&a.weight).then(a.id.cmp(&b.id))
}

/// NaN => -inf (never picked); +inf => f32::MAX (keeps `x - max` finite).
fn clean(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX
    } else {
        x
    }
}

/// Index of the largest value, ties to the lowest index; None if every value is -inf.
/// Two simple passes (max, then first position of it) vectorise; one fused pass does not.
fn argmax(xs: &[f32]) -> Option<usize> {
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if max == f32::NEG_INFINITY {
        return None;
    }
    xs.iter().position(|&x| x == max)
}

/// `exp(x)` for `x <= 0` (including -inf), within ~3e-7 relative error.
///
/// Written out rather than calling `f32::exp` for two reasons: it is branch-free, so a loop over
/// a 150k vocabulary vectorises (several times faster than libm), and it is plain IEEE arithmetic,
/// so weights (and therefore seeded draws) are bit-identical on every platform, whereas libm's
/// `expf` differs between C libraries.
fn exp_neg(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so `n * LN2_HI` is exact (Cody-Waite)
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = if x < -87.0 { -87.0 } else { x }; // keeps 2^n a normal float
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor series to r^6: for |r| <= ln2 / 2 the dropped terms are about one f32 ulp.
    let p = 1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0));
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * p)));
    // The low mantissa bits of `t` hold n; move n + 127 into the exponent field to make 2^n.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

/// `out[i] = exp((xs[i] - shift) / t)`, reusing `out`'s allocation.
fn exp_into(out: &mut Vec<f32>, xs: &[f32], shift: f32, t: f32) {
    out.clear();
    out.extend(xs.iter().map(|&x| exp_neg((x - shift) / t)));
}

/// Sum (in f64) of the values `>= min`. Eight independent lanes: one long dependent chain of
/// adds is several times slower, and the fixed lane layout keeps the result reproducible.
fn mass(xs: &[f32], min: f32) -> f64 {
    let keep = |x: f32| if x >= min { f64::from(x) } else { 0.0 };
    let mut lanes = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&x| keep(x)).sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += keep(x);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// Draws an index with probability proportional to `ws` (weights >= 0, at least one > 0).
/// Walks per-chunk sums first, so only one chunk is scanned element by element.
fn draw_index(ws: &[f32], u01: f64) -> Option<usize> {
    const CHUNK: usize = 256;
    let total: f64 = ws.chunks(CHUNK).map(|c| mass(c, 0.0)).sum();
    let mut u = u01 * total;
    for (ci, c) in ws.chunks(CHUNK).enumerate() {
        let s = mass(c, 0.0);
        if u < s {
            for (j, &w) in c.iter().enumerate() {
                if u < f64::from(w) {
                    return Some(ci * CHUNK + j);
                }
                u -= f64::from(w);
            }
            // Rounding left u just past this chunk's last token: it belongs there.
            return c.iter().rposition(|&w| w > 0.0).map(|j| ci * CHUNK + j);
        }
        u -= s;
    }
    ws.iter().rposition(|&w| w > 0.0)
}

/// Nucleus (top_p) over a whole vocabulary of weights: zeroes every weight outside the smallest
/// most-likely set whose weight reaches `target`, without sorting the vocabulary.
fn nucleus(ws: &mut [f32], cands: &mut Vec<Cand>, target: f64) {
    // Every token at or above a weight threshold ranks before every token below it, so when
    // the tokens above it already hold `target` the nucleus lies among them. Real logits are
    // peaked, so a coarse threshold usually leaves only a few hundred candidates.
    let mut threshold = 0.0;
    for t in [1e-2, 1e-4, 1e-8] {
        if mass(ws, t) >= target {
            threshold = t;
            break;
        }
    }
    cands.clear();
    for (i, &w) in ws.iter().enumerate() {
        if w > 0.0 && w >= threshold {
            cands.push(cand(i, 0.0, w));
        }
    }
    // Find the boundary token by bisecting on rank: each select_nth is O(len) and halves the
    // unresolved range, so the whole search is O(len). Invariant: `before` is the weight of the
    // tokens known to rank above cands[lo..hi].
    let (mut lo, mut hi, mut before) = (0, cands.len(), 0.0f64);
    let mut boundary = None;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by(mid - lo, by_weight_desc);
        let left: f64 = cands[lo..mid].iter().map(|c| f64::from(c.weight)).sum();
        let pivot = cands[mid];
        if before + left >= target {
            hi = mid;
        } else if before + left + f64::from(pivot.weight) >= target {
            boundary = Some(pivot);
            break;
        } else {
            before += left + f64::from(pivot.weight);
            lo = mid + 1;
        }
    }
    for (i, w) in ws.iter_mut().enumerate() {
        let keep = match boundary {
            Some(b) => *w > b.weight || (*w == b.weight && i as u32 <= b.id),
            // All candidates together fall short of `target` (min_p removed some, or rounding
            // differs from `mass`): keep them all.
            None => *w >= threshold,
        };
        if !keep {
            *w = 0.0;
        }
    }
}

/// The k highest logits (ties to lower ids) as candidates, in id order. `scratch` is reused.
///
/// Selecting on a plain f32 copy is much cheaper than on (id, logit) pairs; the k-th value
/// found there then picks the candidates in one scan. Ranking uses `total_cmp` throughout so the
/// selection and the scan agree even on -0.0 vs 0.0.
fn top_k_into(xs: &[f32], k: usize, scratch: &mut Vec<f32>, cands: &mut Vec<Cand>) {
    cands.clear();
    scratch.clear();
    scratch.extend_from_slice(xs);
    let (above, &mut kth, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    // Of the tokens equal to the k-th value, only the lowest-id ones that still fit are kept.
    let mut ties_left = k - above.iter().filter(|x| x.total_cmp(&kth).is_gt()).count();
    for (i, &logit) in xs.iter().enumerate() {
        let keep = match logit.total_cmp(&kth) {
            Ordering::Greater => true,
            Ordering::Equal if ties_left > 0 => {
                ties_left -= 1;
                true
            }
            _ => false,
        };
        // -inf tokens have probability zero: never candidates, even inside the top k.
        if keep && logit > f32::NEG_INFINITY {
            cands.push(cand(i, logit, 0.0));
        }
    }
}

/// Top-n (id, clean logit), highest first, ties to lower id; skips zero-probability tokens.
/// A single pass with a tiny sorted buffer: n <= 20, so no vocab-sized sort or allocation.
fn top_n(logits: &[f32], n: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if n == 0 {
        return;
    }
    for (i, &x) in logits.iter().enumerate() {
        let x = clean(x);
        if x == f32::NEG_INFINITY {
            continue;
        }
        // Equal to the current last: the earlier (lower) id already there wins the tie.
        if out.len() == n && out.last().is_some_and(|&(_, v)| x <= v) {
            continue;
        }
        let pos = out.iter().position(|&(_, v)| x > v).unwrap_or(out.len());
        if out.len() == n {
            out.pop();
        }
        out.insert(pos, (i as u32, x));
    }
}

/// Per-request sampler: owns the params, the RNG, and the counts of tokens seen (for penalties).
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Every token id seen in the prompt or output → times generated (0 = prompt only).
    /// Sparse, so penalties cost O(distinct tokens seen), not O(vocab).
    seen: HashMap<u32, u32>,
    /// Scratch buffers kept between calls so a hot decode loop does not allocate.
    work: Vec<f32>,
    probs: Vec<f32>,
    cands: Vec<Cand>,
}

impl Sampler {
    /// Validates params. `fallback_seed` is used when params.seed is None (caller supplies entropy).
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = Rng::from_seed(params.seed.unwrap_or(fallback_seed));
        Ok(Self {
            params,
            rng,
            seen: HashMap::new(),
            work: Vec::new(),
            probs: Vec::new(),
            cands: Vec::new(),
        })
    }

    /// The validated parameters this sampler runs with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records prompt tokens (they count for repetition_penalty only).
    pub fn observe_prompt(&mut self, prompt: &[u32]) {
        for &t in prompt {
            self.seen.entry(t).or_insert(0);
        }
    }

    /// Picks the next token from one position's logits (len = vocab size) and records it as
    /// generated. Errors if logits is empty or holds no finite value; NaN counts as -inf.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::BadLogits("empty logits"));
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(SamplingError::BadLogits("vocab larger than u32 ids"));
        }
        self.work.clear();
        self.work.extend(logits.iter().map(|&x| clean(x)));
        let raw_max = self.work.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if raw_max == f32::NEG_INFINITY {
            return Err(SamplingError::BadLogits("all logits are NaN or -inf"));
        }
        // log Σ exp(x - max) of the raw logits, taken before penalties change `work`.
        exp_into(&mut self.probs, &self.work, raw_max, 1.0);
        let lse = mass(&self.probs, 0.0).ln();
        let logprob_of = |x: f32| (f64::from(x) - f64::from(raw_max) - lse) as f32;
        self.apply_penalties();

        let chosen = if self.params.temperature == 0.0 {
            argmax(&self.work).ok_or(ALL_MASKED)? as u32
        } else {
            self.draw()?
        };

        let mut top_logprobs = Vec::new();
        if let Some(n) = self.params.logprobs {
            top_n(logits, n as usize, &mut top_logprobs);
            for e in &mut top_logprobs {
                e.1 = logprob_of(e.1);
            }
        }

        *self.seen.entry(chosen).or_insert(0) += 1;
        Ok(Sampled {
            token_id: chosen,
            logprob: logprob_of(clean(logits[chosen as usize])),
            top_logprobs,
        })
    }

    /// Applies the penalties to `work`, touching only tokens seen so far.
    fn apply_penalties(&mut self) {
        let rep = self.params.repetition_penalty;
        let presence = self.params.presence_penalty;
        let frequency = self.params.frequency_penalty;
        if rep == 1.0 && presence == 0.0 && frequency == 0.0 {
            return;
        }
        for (&id, &generated) in &self.seen {
            // Ids outside this vocab (e.g. a stray prompt id) have no logit to penalise.
            let Some(x) = self.work.get_mut(id as usize) else {
                continue;
            };
            // HF semantics: shrink positive logits, push negative ones further down, so the
            // token always becomes less likely whatever its sign.
            if rep != 1.0 {
                *x = if *x > 0.0 { *x / rep } else { *x * rep };
            }
            if generated > 0 {
                *x -= presence + frequency * generated as f32;
            }
            *x = clean(*x);
        }
    }

    /// Temperature > 0 path: truncate, then draw one token with the RNG.
    fn draw(&mut self) -> Result<u32, SamplingError> {
        let p = &self.params;
        let max = self.work.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        if max == f32::NEG_INFINITY {
            return Err(ALL_MASKED);
        }
        // Exactly one random number per draw, whatever the settings, keeps streams aligned.
        let u = self.rng.next_f64();
        // Weights are exp((x - max) / t): the best token weighs exactly 1, nothing overflows,
        // and dividing (not multiplying by 1/t) stays finite for tiny t. min_p's test
        // `prob < min_p * max_prob` is then simply `weight < min_p`.
        //
        // min_p and top_p both keep a most-likely prefix and never drop the top token, so
        // their order does not matter; min_p goes first because it needs no ranking. top_p is
        // still measured against the softmax over all top_k survivors, as specified.
        let k = p.top_k as usize;
        if k > 0 && k < self.work.len() {
            let cands = &mut self.cands;
            top_k_into(&self.work, k, &mut self.probs, cands);
            cands.sort_unstable_by(by_logit_desc);
            for c in cands.iter_mut() {
                c.weight = exp_neg((c.logit - max) / p.temperature);
            }
            let total: f64 = cands.iter().map(|c| f64::from(c.weight)).sum();
            cands.retain(|c| c.weight >= p.min_p);
            if p.top_p < 1.0 {
                let target = f64::from(p.top_p) * total;
                let mut acc = 0.0;
                if let Some(n) = cands.iter().position(|c| {
                    acc += f64::from(c.weight);
                    acc >= target
                }) {
                    cands.truncate(n + 1);
                }
            }
            self.probs.clear();
            self.probs.extend(cands.iter().map(|c| c.weight));
            let pick = draw_index(&self.probs, u).and_then(|i| cands.get(i));
            pick.map(|c| c.id).ok_or(ALL_MASKED)
        } else {
            exp_into(&mut self.probs, &self.work, max, p.temperature);
            let total = mass(&self.probs, 0.0);
            if p.min_p > 0.0 {
                for w in self.probs.iter_mut() {
                    *w = if *w < p.min_p { 0.0 } else { *w }; // branch-free: vectorises
                }
            }
            if p.top_p < 1.0 {
                nucleus(&mut self.probs, &mut self.cands, f64::from(p.top_p) * total);
            }
            let pick = draw_index(&self.probs, u);
            pick.map(|i| i as u32).ok_or(ALL_MASKED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let seed = Some(1234);
        let mut p = SamplingParams {
            seed,
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        Sampler::new(params(f), 0).unwrap()
    }

    fn draw_ids(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
        (0..n).map(|_| s.sample(logits).unwrap().token_id).collect()
    }

    fn share(ids: &[u32], tok: u32) -> f64 {
        ids.iter().filter(|&&id| id == tok).count() as f64 / ids.len() as f64
    }

    /// Pseudo-random logits spread over [-5, 5), from an independent LCG.
    fn test_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        let mut next = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 10.0 - 5.0
        };
        (0..n).map(|_| next()).collect()
    }

    #[test]
    fn validate_names_the_bad_field() {
        type Edit = fn(&mut SamplingParams);
        let cases: [(Edit, &str); 11] = [
            (|p| p.temperature = -1.0, "temperature"),
            (|p| p.temperature = f32::NAN, "temperature"),
            (|p| p.temperature = f32::INFINITY, "temperature"),
            (|p| p.top_p = 0.0, "top_p"),
            (|p| p.top_p = 1.5, "top_p"),
            (|p| p.min_p = 1.5, "min_p"),
            (|p| p.repetition_penalty = 0.0, "repetition_penalty"),
            (|p| p.presence_penalty = 3.0, "presence_penalty"),
            (|p| p.frequency_penalty = -2.5, "frequency_penalty"),
            (|p| p.logprobs = Some(21), "logprobs"),
            (|p| p.min_p = f32::NAN, "min_p"),
        ];
        for (edit, want) in cases {
            match params(edit).validate() {
                Err(SamplingError::Invalid { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: expected Invalid, got {other:?}"),
            }
            assert!(Sampler::new(params(edit), 0).is_err());
        }
        assert!(SamplingParams::default().validate().is_ok());
        assert!(params(|p| p.logprobs = Some(20)).validate().is_ok());
    }

    #[test]
    fn rng_matches_reference_vectors() {
        // Published first outputs of splitmix64 from state 0 and of xoshiro256** from [1,2,3,4].
        assert_eq!(splitmix64(&mut 0), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240, 1215971899390074240]);
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() {
        let mut s = sampler(|p| p.temperature = 0.0);
        assert_eq!(draw_ids(&mut s, &[0.1, 2.0, -3.0, 1.9], 1), [1]);
        assert_eq!(draw_ids(&mut s, &[1.0, 5.0, 5.0, 5.0], 1), [1]);
        let logits = test_logits(50_000, 9);
        let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b]));
        assert_eq!(draw_ids(&mut s, &logits, 1), [best.unwrap() as u32]);
    }

    #[test]
    fn bad_logits_are_errors_not_panics() {
        let mut s = sampler(|_| {});
        let bad = SamplingError::BadLogits;
        assert_eq!(s.sample(&[]), Err(bad("empty logits")));
        assert_eq!(
            s.sample(&[f32::NAN; 4]),
            Err(bad("all logits are NaN or -inf"))
        );
        assert!(s.sample(&[f32::NEG_INFINITY, f32::NAN]).is_err());
        // NaN is never chosen; +inf dominates and its logprob is finite.
        for _ in 0..50 {
            assert_eq!(draw_ids(&mut s, &[f32::NAN, 0.0, f32::NAN], 1), [1]);
            let r = s.sample(&[0.0, f32::INFINITY, 1.0]).unwrap();
            assert_eq!(r.token_id, 1);
            assert!(r.logprob.is_finite());
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let logits: Vec<f32> = test_logits(100, 3).iter().map(|x| x * 0.05).collect();
        let run = |seed| draw_ids(&mut sampler(|p| p.seed = Some(seed)), &logits, 64);
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // fallback_seed stands in for a missing seed.
        let mut a = Sampler::new(params(|p| p.seed = None), 7).unwrap();
        assert_eq!(draw_ids(&mut a, &logits, 64), run(7));
    }

    #[test]
    fn seeded_output_is_pinned() {
        // Regression pin: a change here breaks "same seed => same output" for users. Flat
        // logits make every weight exactly 1, so the draw is floor(u * 10); the expected ids were
        // computed by a separate Python implementation of splitmix64 + xoshiro256**.
        let mut s = sampler(|p| p.seed = Some(42));
        let want = [0, 3, 6, 9, 9, 7, 7, 8, 7, 5, 6, 2];
        assert_eq!(draw_ids(&mut s, &[0.0; 10], 12), want);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_equal_greedy() {
        let logits = test_logits(32_000, 5);
        let greedy = draw_ids(&mut sampler(|p| p.temperature = 0.0), &logits, 1)[0];
        for t in [0.1, 1.0, 5.0, 100.0] {
            let mut k1 = sampler(|p| (p.temperature, p.top_k) = (t, 1));
            assert_eq!(share(&draw_ids(&mut k1, &logits, 20), greedy), 1.0);
            let mut p0 = sampler(|p| (p.temperature, p.top_p) = (t, 1e-6));
            assert_eq!(share(&draw_ids(&mut p0, &logits, 20), greedy), 1.0);
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [3.0, 2.9, 2.8, 0.0, -1.0];
        let ids = draw_ids(&mut sampler(|p| p.top_k = 3), &logits, 500);
        assert!(ids.iter().all(|&id| id < 3) && ids.contains(&2));
        // Probs ≈ .35 .32 .29 .03 .01: top_p 0.6 needs exactly the first two tokens.
        let ids = draw_ids(&mut sampler(|p| p.top_p = 0.6), &logits, 500);
        assert!(ids.iter().all(|&id| id < 2) && ids.contains(&0) && ids.contains(&1));
    }

    #[test]
    fn nucleus_matches_a_full_sort() {
        // Weights spanning many magnitudes exercise every threshold and the rank bisection;
        // the kept set must equal the one a plain sort-and-accumulate finds.
        let ws: Vec<f32> = test_logits(20_000, 11)
            .iter()
            .map(|x| exp_neg(x * 4.0 - 20.0))
            .collect();
        let total = mass(&ws, 0.0);
        let mut order: Vec<usize> = (0..ws.len()).collect();
        order.sort_by(|&a, &b| ws[b].total_cmp(&ws[a]).then(a.cmp(&b)));
        // (Targets within f64 rounding of the total are left out: there summation order decides.)
        for top_p in [1e-9, 0.3, 0.9, 0.999, 0.999_999_9] {
            let target = top_p * total;
            let mut acc = 0.0;
            let n = order.iter().position(|&i| {
                acc += f64::from(ws[i]);
                acc >= target
            });
            let mut want: Vec<usize> = order[..n.map_or(ws.len(), |n| n + 1)].to_vec();
            want.sort_unstable();
            let mut got = ws.clone();
            nucleus(&mut got, &mut Vec::new(), target);
            let kept: Vec<usize> = (0..got.len()).filter(|&i| got[i] > 0.0).collect();
            assert_eq!(kept, want, "top_p {top_p}");
            assert!(kept.iter().all(|&i| got[i] == ws[i]));
        }
    }

    #[test]
    fn top_k_into_breaks_ties_by_id_and_skips_neg_inf() {
        let ids = |xs: &[f32], k| {
            let mut cands = Vec::new();
            top_k_into(xs, k, &mut Vec::new(), &mut cands);
            cands.iter().map(|c| c.id).collect::<Vec<_>>()
        };
        let ninf = f32::NEG_INFINITY;
        assert_eq!(ids(&[1.0, 3.0, 3.0, 3.0, ninf, 2.0], 2), [1, 2]);
        assert_eq!(ids(&[1.0, 3.0, 3.0, 3.0, ninf, 2.0], 4), [1, 2, 3, 5]);
        assert_eq!(ids(&[1.0, ninf, ninf, 2.0, 0.0], 4), [0, 3, 4]);
        // Many ties (logits rounded to integers) against a full sort.
        let xs: Vec<f32> = test_logits(5000, 2).iter().map(|x| x.round()).collect();
        let mut order: Vec<u32> = (0..5000).collect();
        order.sort_by(|&a, &b| xs[b as usize].total_cmp(&xs[a as usize]).then(a.cmp(&b)));
        let mut want = order[..777].to_vec();
        want.sort_unstable();
        assert_eq!(ids(&xs, 777), want);
    }

    #[test]
    fn exp_neg_is_accurate() {
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(-100.0), 0.0);
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let rel = (f64::from(exp_neg(x)) - want).abs() / want;
            assert!(rel < 5e-7, "exp({x}): rel err {rel}");
            x += 0.0037;
        }
    }

    #[test]
    fn draw_index_follows_weights() {
        let ws = [0.0f32, 1.0, 0.0, 3.0];
        assert_eq!(draw_index(&ws, 0.0), Some(1));
        assert_eq!(draw_index(&ws, 0.2499), Some(1));
        assert_eq!(draw_index(&ws, 0.25), Some(3));
        assert_eq!(draw_index(&ws, 0.999_999), Some(3));
        assert_eq!(draw_index(&[0.0; 4], 0.5), None);
        // Across chunk boundaries: weight only at the far end of a long vector.
        let mut long = vec![0.0f32; 1000];
        long[700] = 1.0;
        long[999] = 1.0;
        assert_eq!(draw_index(&long, 0.4), Some(700));
        assert_eq!(draw_index(&long, 0.6), Some(999));
    }

    #[test]
    fn min_p_excludes_unlikely_tokens() {
        // Relative probs 1, 0.37, 0.05: min_p 0.1 drops only token 2.
        let logits = [0.0, -1.0, -3.0];
        let with = draw_ids(&mut sampler(|p| p.min_p = 0.1), &logits, 3000);
        assert!(!with.contains(&2) && with.contains(&1));
        let without = draw_ids(&mut sampler(|_| {}), &logits, 3000);
        assert!(share(&without, 2) > 0.01);
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, -1.0];
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let ids = draw_ids(&mut sampler(|_| {}), &logits, 20_000);
        for (tok, &x) in logits.iter().enumerate() {
            let (freq, prob) = (share(&ids, tok as u32), f64::from(x).exp() / z);
            assert!(
                (freq - prob).abs() < 0.02,
                "{tok}: freq {freq} vs prob {prob}"
            );
        }
        // Temperature 2 flattens: token 2's share rises from ~9% to ~19%.
        let hot = draw_ids(&mut sampler(|p| p.temperature = 2.0), &logits, 20_000);
        assert!((share(&hot, 2) - 0.186).abs() < 0.02);
    }

    #[test]
    fn repetition_penalty_flips_argmax_for_both_signs() {
        let greedy = |rep: f32, logits: &[f32]| {
            let mut s = sampler(|p| (p.temperature, p.repetition_penalty) = (0.0, rep));
            s.observe_prompt(&[0, 99_999]); // out-of-vocab id is ignored
            draw_ids(&mut s, logits, 1)[0]
        };
        // Positive: 2.0 / 1.5 = 1.33 < 1.5. Negative: -1.0 * 1.5 = -1.5 < -1.2.
        assert_eq!(greedy(1.0, &[2.0, 1.5]), 0);
        assert_eq!(greedy(1.5, &[2.0, 1.5]), 1);
        assert_eq!(greedy(1.0, &[-1.0, -1.2]), 0);
        assert_eq!(greedy(1.5, &[-1.0, -1.2]), 1);
        // A penalty < 1 rewards repeats instead.
        assert_eq!(greedy(0.5, &[1.0, 1.5]), 0);
    }

    #[test]
    fn presence_penalty_counts_generated_tokens_only() {
        let mut s = sampler(|p| (p.temperature, p.presence_penalty) = (0.0, 0.5));
        s.observe_prompt(&[0]);
        // 0 first (prompt does not count), then 0.5 < 0.8 → 1, then 0.3 < 0.5 → 0.
        assert_eq!(draw_ids(&mut s, &[1.0, 0.8], 3), [0, 1, 0]);
    }

    #[test]
    fn frequency_penalty_grows_with_count() {
        let mut s = sampler(|p| (p.temperature, p.frequency_penalty) = (0.0, 0.3));
        s.observe_prompt(&[0, 0, 0]); // prompt repeats do not count
                                      // Token 0 scores 1 - 0.3c: beaten by token 1 (0.0) once c = 4; then -0.3 < -0.2.
        assert_eq!(draw_ids(&mut s, &[1.0, 0.0], 6), [0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn logprobs_are_raw_log_softmax_with_ordered_top_list() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, f32::NAN, 0.5];
        let finite = logits.iter().filter(|x| !x.is_nan()).map(|&x| f64::from(x));
        let lse = finite.map(f64::exp).sum::<f64>().ln();
        let lp = |i: u32| (f64::from(logits[i as usize]) - lse) as f32;
        // Penalties and temperature must not leak into the reported logprobs.
        let mut s = sampler(|p| {
            (p.temperature, p.repetition_penalty, p.logprobs) = (0.5, 1.3, Some(4));
        });
        s.observe_prompt(&[1]);
        for _ in 0..20 {
            let r = s.sample(&logits).unwrap();
            assert!((r.logprob - lp(r.token_id)).abs() < 1e-5);
            let ids: Vec<u32> = r.top_logprobs.iter().map(|e| e.0).collect();
            assert_eq!(ids, [1, 2, 0, 5]);
            for &(id, v) in &r.top_logprobs {
                assert!((v - lp(id)).abs() < 1e-5, "id {id}: {v} vs {}", lp(id));
            }
        }
        // More requested than finite tokens: the NaN one is left out.
        let mut all = sampler(|p| p.logprobs = Some(20));
        assert_eq!(all.sample(&logits).unwrap().top_logprobs.len(), 5);
        let mut none = sampler(|_| {});
        assert!(none.sample(&logits).unwrap().top_logprobs.is_empty());
    }
}
