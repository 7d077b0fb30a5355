//! Splitting one MoE layer's request among a node's devices, and adding the devices'
//! partial sums back together. Pure functions, tested here.
//!
//! Each expert slot `(row, k)` goes to one device that hosts the expert (the caller
//! picks which). A device receives only the rows that have at least one slot for it,
//! compacted, with the slots of other devices set to [`NO_EXPERT`]; its partial sums are
//! added back to the original rows in device order, so the result does not depend on
//! which device answered first.

use std::collections::HashMap;

use moe_proto::NO_EXPERT;

/// One device's share of a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Part {
    /// Device index.
    pub device: usize,
    /// `[m, hidden]`: the rows with a slot on this device, in their original order.
    pub rows: Vec<f32>,
    /// `[m, top_k]`: expert ids, [`NO_EXPERT`] for slots of other devices.
    pub ids: Vec<u32>,
    /// `[m, top_k]`: routing weights.
    pub weights: Vec<f32>,
    /// Original row index of each of the `m` rows.
    pub row_map: Vec<usize>,
}

/// Splits a request with `rows` `[n, hidden]` and `ids`/`weights` `[n, top_k]` (sizes
/// already validated) among devices: `host(expert)` names the device for an expert, or
/// `None` if no device hosts it, which fails the split with that expert's id.
pub(crate) fn split(
    hidden: usize,
    top_k: usize,
    rows: &[f32],
    ids: &[u32],
    weights: &[f32],
    mut host: impl FnMut(u32) -> Option<usize>,
) -> Result<Vec<Part>, u32> {
    let n = ids.len().checked_div(top_k).unwrap_or(0);
    let mut chosen: HashMap<u32, usize> = HashMap::new();
    // Device of each slot, or None for a skipped slot.
    let mut slot_device: Vec<Option<usize>> = Vec::with_capacity(ids.len());
    for &e in ids {
        if e == NO_EXPERT {
            slot_device.push(None);
            continue;
        }
        let d = match chosen.get(&e) {
            Some(d) => *d,
            None => {
                let d = host(e).ok_or(e)?;
                chosen.insert(e, d);
                d
            }
        };
        slot_device.push(Some(d));
    }
    let mut devices: Vec<usize> = chosen.values().copied().collect();
    devices.sort_unstable();
    devices.dedup();
    let mut parts = Vec::with_capacity(devices.len());
    for d in devices {
        let mut part = Part {
            device: d,
            rows: Vec::new(),
            ids: Vec::new(),
            weights: Vec::new(),
            row_map: Vec::new(),
        };
        for r in 0..n {
            let slots = r * top_k..(r + 1) * top_k;
            if !slot_device[slots.clone()].contains(&Some(d)) {
                continue;
            }
            part.row_map.push(r);
            part.rows
                .extend_from_slice(&rows[r * hidden..(r + 1) * hidden]);
            for s in slots {
                let mine = slot_device[s] == Some(d);
                part.ids.push(if mine { ids[s] } else { NO_EXPERT });
                part.weights.push(if mine { weights[s] } else { 0.0 });
            }
        }
        parts.push(part);
    }
    Ok(parts)
}

/// Adds each device's `[m, hidden]` partial sums into an `[n, hidden]` result at the
/// rows given by its `row_map`, in the order given (callers pass device order).
pub(crate) fn merge(n: usize, hidden: usize, partials: &[(Vec<usize>, Vec<f32>)]) -> Vec<f32> {
    let mut out = vec![0f32; n * hidden];
    for (row_map, values) in partials {
        for (j, &r) in row_map.iter().enumerate() {
            let (Some(dst), Some(src)) = (
                out.get_mut(r * hidden..(r + 1) * hidden),
                values.get(j * hidden..(j + 1) * hidden),
            ) else {
                continue;
            };
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_slots_by_device_and_compacts_rows() {
        // 3 rows of width 2, top-2. Experts 0,1 on device 0; expert 2 on device 1.
        let rows = vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5];
        let ids = vec![0, 2, 1, NO_EXPERT, 2, 0];
        let weights = vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        let parts = split(2, 2, &rows, &ids, &weights, |e| match e {
            0 | 1 => Some(0),
            2 => Some(1),
            _ => None,
        })
        .unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].device, 0);
        assert_eq!(parts[0].row_map, vec![0, 1, 2]);
        assert_eq!(parts[0].ids, vec![0, NO_EXPERT, 1, NO_EXPERT, NO_EXPERT, 0]);
        assert_eq!(parts[0].weights, vec![0.1, 0.0, 0.3, 0.0, 0.0, 0.6]);
        assert_eq!(parts[1].device, 1);
        assert_eq!(parts[1].row_map, vec![0, 2]);
        assert_eq!(parts[1].rows, vec![1.0, 1.5, 3.0, 3.5]);
        assert_eq!(parts[1].ids, vec![NO_EXPERT, 2, 2, NO_EXPERT]);
    }

    #[test]
    fn unhosted_expert_fails_the_split() {
        let err = split(1, 1, &[1.0], &[7], &[1.0], |_| None).unwrap_err();
        assert_eq!(err, 7);
    }

    #[test]
    fn all_skipped_gives_no_parts() {
        let parts = split(1, 2, &[1.0], &[NO_EXPERT, NO_EXPERT], &[0.5, 0.5], |_| {
            Some(0)
        })
        .unwrap();
        assert!(parts.is_empty());
    }

    #[test]
    fn merge_adds_partials_at_their_rows() {
        let out = merge(
            3,
            2,
            &[
                (vec![0, 2], vec![1.0, 1.0, 2.0, 2.0]),
                (vec![2], vec![0.5, 0.25]),
            ],
        );
        assert_eq!(out, vec![1.0, 1.0, 0.0, 0.0, 2.5, 2.25]);
    }
}
