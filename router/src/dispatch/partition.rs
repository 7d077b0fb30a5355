//! Splitting one MoE layer's rows among the workers that host their experts, and adding
//! the workers' partial sums back: pure functions over a route table, so the policy
//! (spread an expert's rows over its copies, avoid workers that failed) is tested
//! without a network.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use moe_model::experts::NO_EXPERT;
use moe_model::{ExpertError, MoeRequest};

/// `(layer, expert)` → indices of the workers hosting a ready copy.
pub(crate) type Routes = HashMap<(usize, u32), Vec<usize>>;

/// One worker's share of a MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Part {
    pub worker: usize,
    /// Row indices of the request, in order.
    pub rows: Vec<usize>,
    /// `rows.len() × top_k` expert ids, NO_EXPERT where another worker has the slot.
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Splits `req` among the workers of `routes`. An expert's rows are spread over its
/// copies on workers neither in `avoid` (failed in this call) nor in `down` (failed
/// recently); when no such copy is left, over those not in `avoid` (a recently failed
/// worker may have recovered), and only then over every copy. Fails naming the experts
/// that no worker hosts.
pub(super) fn split(
    req: &MoeRequest<'_>,
    routes: &Routes,
    avoid: &[usize],
    down: &[usize],
) -> Result<Vec<Part>, ExpertError> {
    let k = req.top_k;
    let mut parts: BTreeMap<usize, Part> = BTreeMap::new();
    let mut missing: BTreeSet<u32> = BTreeSet::new();
    for row in 0..req.num_rows() {
        for s in 0..k {
            let e = req.expert_ids[row * k + s];
            if e == NO_EXPERT {
                continue;
            }
            let hosts = routes
                .get(&(req.layer, e))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let healthy: Vec<usize> = hosts
                .iter()
                .copied()
                .filter(|w| !avoid.contains(w) && !down.contains(w))
                .collect();
            let pool = if !healthy.is_empty() {
                healthy
            } else {
                let fresh: Vec<usize> = hosts
                    .iter()
                    .copied()
                    .filter(|w| !avoid.contains(w))
                    .collect();
                if fresh.is_empty() {
                    hosts.to_vec()
                } else {
                    fresh
                }
            };
            let Some(&w) = pool.get(row % pool.len().max(1)) else {
                missing.insert(e);
                continue;
            };
            let part = parts.entry(w).or_insert_with(|| Part {
                worker: w,
                rows: Vec::new(),
                ids: Vec::new(),
                weights: Vec::new(),
            });
            if part.rows.last() != Some(&row) {
                part.rows.push(row);
                part.ids.extend(std::iter::repeat_n(NO_EXPERT, k));
                part.weights.extend(std::iter::repeat_n(0.0, k));
            }
            let base = (part.rows.len() - 1) * k;
            part.ids[base + s] = e;
            part.weights[base + s] = req.weights[row * k + s];
        }
    }
    if !missing.is_empty() {
        return Err(ExpertError::Unavailable(format!(
            "no live worker hosts layer {} experts {:?}",
            req.layer, missing
        )));
    }
    Ok(parts.into_values().collect())
}

/// The request's rows that `part` carries, `[part.rows.len(), hidden]`.
pub(super) fn gather_rows(req: &MoeRequest<'_>, part: &Part, hidden: usize) -> Vec<f32> {
    let h = hidden;
    let mut rows = Vec::with_capacity(part.rows.len() * h);
    for r in &part.rows {
        rows.extend_from_slice(&req.rows[r * h..(r + 1) * h]);
    }
    rows
}

/// Adds a worker's answer for `part` (`[part.rows.len(), hidden]`) into `out`
/// (`[n, hidden]`), row by row.
pub(super) fn add_partial(out: &mut [f32], part: &Part, partial: &[f32], hidden: usize) {
    let h = hidden;
    for (j, r) in part.rows.iter().enumerate() {
        for (o, v) in out[r * h..(r + 1) * h]
            .iter_mut()
            .zip(&partial[j * h..(j + 1) * h])
        {
            *o += v;
        }
    }
}

/// The expert ids of a request (`[n, top_k]`) that keeps only the slots `failed` parts
/// carried, NO_EXPERT elsewhere: what is left to compute after they failed.
pub(super) fn retry_slots<'a>(
    req: &MoeRequest<'_>,
    failed: impl IntoIterator<Item = &'a Part>,
) -> Vec<u32> {
    let k = req.top_k;
    let mut ids = vec![NO_EXPERT; req.expert_ids.len()];
    for part in failed {
        for (j, r) in part.rows.iter().enumerate() {
            for s in 0..k {
                let id = part.ids[j * k + s];
                if id != NO_EXPERT {
                    ids[r * k + s] = id;
                }
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: usize = 2;

    /// A request of `ids.len() / top_k` rows; row r is `[r, r]`, slot weights 1, 2, ….
    fn request<'a>(
        rows: &'a mut Vec<f32>,
        weights: &'a mut Vec<f32>,
        ids: &'a [u32],
        top_k: usize,
    ) -> MoeRequest<'a> {
        let n = ids.len() / top_k;
        *rows = (0..n).flat_map(|r| [r as f32; H]).collect();
        *weights = (0..ids.len()).map(|i| (i + 1) as f32).collect();
        MoeRequest {
            layer: 1,
            hidden: H,
            top_k,
            rows,
            expert_ids: ids,
            weights,
        }
    }

    fn routes(entries: &[(u32, &[usize])]) -> Routes {
        entries
            .iter()
            .map(|(e, hosts)| ((1, *e), hosts.to_vec()))
            .collect()
    }

    /// Every non-empty slot of `req` is carried by exactly one part, with its weight.
    fn assert_covers(req: &MoeRequest<'_>, parts: &[Part]) {
        let k = req.top_k;
        for row in 0..req.num_rows() {
            for s in 0..k {
                let e = req.expert_ids[row * k + s];
                let carriers: Vec<(u32, f32)> = parts
                    .iter()
                    .filter_map(|p| {
                        let j = p.rows.iter().position(|r| *r == row)?;
                        let id = p.ids[j * k + s];
                        (id != NO_EXPERT).then_some((id, p.weights[j * k + s]))
                    })
                    .collect();
                if e == NO_EXPERT {
                    assert!(carriers.is_empty(), "row {row} slot {s}: {carriers:?}");
                } else {
                    assert_eq!(
                        carriers,
                        vec![(e, req.weights[row * k + s])],
                        "row {row} slot {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_of_an_expert_are_spread_over_its_copies() {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        let ids = [7, 7, 7, 7];
        let req = request(&mut rows, &mut weights, &ids, 1);
        let parts = split(&req, &routes(&[(7, &[0, 1])]), &[], &[]).expect("hosted");
        assert_covers(&req, &parts);
        let by_worker: Vec<(usize, Vec<usize>)> =
            parts.iter().map(|p| (p.worker, p.rows.clone())).collect();
        assert_eq!(by_worker, vec![(0, vec![0, 2]), (1, vec![1, 3])]);
    }

    #[test]
    fn a_row_whose_experts_live_apart_goes_to_each_worker_with_the_other_slots_empty() {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        let ids = [3, 4, NO_EXPERT, 4];
        let req = request(&mut rows, &mut weights, &ids, 2);
        let parts = split(&req, &routes(&[(3, &[5]), (4, &[6])]), &[], &[]).expect("hosted");
        assert_covers(&req, &parts);
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].worker, &parts[0].rows), (5, &vec![0]));
        assert_eq!(parts[0].ids, vec![3, NO_EXPERT]);
        assert_eq!((parts[1].worker, &parts[1].rows), (6, &vec![0, 1]));
        assert_eq!(parts[1].ids, vec![NO_EXPERT, 4, NO_EXPERT, 4]);
    }

    #[test]
    fn workers_that_failed_are_avoided_while_another_copy_exists() {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        let ids = [7, 7, 7];
        let req = request(&mut rows, &mut weights, &ids, 1);
        let r = routes(&[(7, &[0, 1, 2])]);
        // Failed in this call (avoid) and marked down are both skipped.
        let parts = split(&req, &r, &[0], &[2]).expect("hosted");
        assert_covers(&req, &parts);
        assert_eq!(parts.iter().map(|p| p.worker).collect::<Vec<_>>(), vec![1]);
        // With every copy down, one that did not fail in this call is preferred.
        let parts = split(&req, &r, &[0], &[0, 1, 2]).expect("hosted");
        assert!(parts.iter().all(|p| p.worker != 0), "{parts:?}");
        assert_covers(&req, &parts);
        // With every copy failed in this call, they are tried again rather than none.
        let parts = split(&req, &r, &[0, 1, 2], &[]).expect("hosted");
        assert_covers(&req, &parts);
    }

    #[test]
    fn experts_without_a_copy_are_named() {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        let ids = [3, 9, 8, 3];
        let req = request(&mut rows, &mut weights, &ids, 2);
        let err = split(&req, &routes(&[(3, &[0]), (8, &[])]), &[], &[])
            .expect_err("experts 8 and 9 have no copy");
        assert!(matches!(err, ExpertError::Unavailable(_)), "{err:?}");
        let m = err.to_string();
        assert!(
            m.contains("no live worker hosts layer 1 experts {8, 9}"),
            "{m}"
        );
    }

    #[test]
    fn partial_sums_add_back_into_their_rows() {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        let ids = [1, 2, 1, 2, 1, 2];
        let req = request(&mut rows, &mut weights, &ids, 2);
        let parts = split(&req, &routes(&[(1, &[0]), (2, &[1])]), &[], &[]).expect("hosted");
        let mut out = vec![0f32; req.num_rows() * H];
        for p in &parts {
            // Each worker answers its gathered rows scaled by (worker + 1).
            let partial: Vec<f32> = gather_rows(&req, p, H)
                .iter()
                .map(|v| v * (p.worker + 1) as f32)
                .collect();
            add_partial(&mut out, p, &partial, H);
        }
        // Row r is [r, r]; both workers carry every row: r·1 + r·2.
        assert_eq!(out, vec![0.0, 0.0, 3.0, 3.0, 6.0, 6.0]);
    }

    #[test]
    fn a_retry_asks_again_for_exactly_the_failed_slots() {
        let (mut rows, mut weights) = (Vec::new(), Vec::new());
        let ids = [1, 2, 2, 1];
        let req = request(&mut rows, &mut weights, &ids, 2);
        let parts = split(&req, &routes(&[(1, &[0]), (2, &[1])]), &[], &[]).expect("hosted");
        let failed: Vec<&Part> = parts.iter().filter(|p| p.worker == 1).collect();
        assert_eq!(retry_slots(&req, failed), vec![NO_EXPERT, 2, 2, NO_EXPERT]);
    }
}
