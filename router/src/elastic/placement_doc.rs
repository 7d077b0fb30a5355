//! The placement document the controller writes under `/moe/<cluster>/placement`, and
//! its checked decoding.

use std::collections::{BTreeMap, BTreeSet};

use moe_control::{DeviceSlot, PlacementPlan, StoredPlacement};
use moe_model::ModelSpec;
use serde::{Deserialize, Serialize};

/// The placement document under `/moe/<cluster>/placement` (its `placement` field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementDoc {
    /// The controller that wrote it, and its fencing token's revision.
    pub controller: String,
    pub token: i64,
    /// The workers it was loaded on: id → where, and which incarnation.
    pub workers: BTreeMap<String, DocWorker>,
    /// Which device hosts which `(layer, expert)`.
    pub devices: Vec<DocDevice>,
}

/// A worker of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DocWorker {
    pub address: String,
    pub incarnation: u64,
}

/// A device of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocDevice {
    pub worker: String,
    pub device: String,
    pub capacity_bytes: u64,
    /// Bytes one expert takes on the device (0: the model's f32 size).
    #[serde(default)]
    pub expert_bytes: u64,
    pub experts: Vec<(usize, u32)>,
}

impl PlacementDoc {
    pub(crate) fn to_plan(&self, version: u64) -> PlacementPlan {
        PlacementPlan {
            version,
            assignments: self
                .devices
                .iter()
                .map(|d| {
                    (
                        DeviceSlot {
                            worker: d.worker.clone(),
                            device: d.device.clone(),
                            capacity_bytes: d.capacity_bytes,
                            expert_bytes: d.expert_bytes,
                        },
                        d.experts.iter().copied().collect(),
                    )
                })
                .collect(),
        }
    }

    pub(super) fn from_plan(
        plan: &PlacementPlan,
        workers: BTreeMap<String, DocWorker>,
        controller: &str,
        token: i64,
    ) -> Self {
        Self {
            controller: controller.to_owned(),
            token,
            workers,
            devices: plan
                .assignments
                .iter()
                .map(|(slot, set)| DocDevice {
                    worker: slot.worker.clone(),
                    device: slot.device.clone(),
                    capacity_bytes: slot.capacity_bytes,
                    expert_bytes: slot.expert_bytes,
                    experts: set.iter().copied().collect(),
                })
                .collect(),
        }
    }

    /// The same workers and assignments (whoever wrote them).
    pub(super) fn same_layout(&self, other: &PlacementDoc) -> bool {
        self.workers == other.workers && self.devices == other.devices
    }

    /// Experts assigned to `worker`, per device.
    pub(crate) fn assigned(&self, worker: &str) -> BTreeMap<String, BTreeSet<(usize, u32)>> {
        self.devices
            .iter()
            .filter(|d| d.worker == worker)
            .map(|d| (d.device.clone(), d.experts.iter().copied().collect()))
            .collect()
    }
}

/// Decodes a stored placement written by a controller; `None` (logged) for one that
/// does not decode or does not fit the model.
pub(super) fn decode(stored: &StoredPlacement, spec: &ModelSpec) -> Option<PlacementDoc> {
    match decode_checked(stored, spec) {
        Ok(doc) => Some(doc),
        Err(e) => {
            tracing::error!(version = stored.version, error = %e, "undecodable placement in etcd; ignoring it");
            None
        }
    }
}

/// A stored placement as a [`PlacementDoc`] that lists each device once and whose
/// every copy is an expert of `spec`'s model (a corrupt document naming others would
/// create routes, and metric series, for experts that do not exist).
pub(crate) fn decode_checked(
    stored: &StoredPlacement,
    spec: &ModelSpec,
) -> Result<PlacementDoc, String> {
    let doc: PlacementDoc =
        serde_json::from_value(stored.placement.clone()).map_err(|e| e.to_string())?;
    let mut seen = BTreeSet::new();
    for d in &doc.devices {
        // Listed twice, a device would be routed to for both lists but told to hold
        // only one (found by fuzzing: fuzz/regressions/placement_document/).
        if !seen.insert((&d.worker, &d.device)) {
            return Err(format!("device {}/{} is listed twice", d.worker, d.device));
        }
        for &(layer, expert) in &d.experts {
            let moe = spec.layers.get(layer) == Some(&moe_model::config::FfnKind::Moe);
            if !moe || expert as usize >= spec.moe.num_experts {
                return Err(format!(
                    "device {}/{} holds expert {expert} of layer {layer}, which this model does not have",
                    d.worker, d.device
                ));
            }
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_spec() -> ModelSpec {
        use moe_model::tiny::{config_json, Size, StoreDtype};
        let json = config_json(moe_model::Arch::Mixtral, Size::Tiny, StoreDtype::F32);
        ModelSpec::from_json(&json.to_string()).unwrap()
    }

    fn doc() -> PlacementDoc {
        PlacementDoc {
            controller: "r0".into(),
            token: 7,
            workers: [(
                "w0".to_owned(),
                DocWorker {
                    address: "127.0.0.1:1".into(),
                    incarnation: 3,
                },
            )]
            .into(),
            devices: vec![DocDevice {
                worker: "w0".into(),
                device: "cpu:0".into(),
                capacity_bytes: 0,
                expert_bytes: 4096,
                experts: vec![(0, 1), (1, 2)],
            }],
        }
    }

    #[test]
    fn placement_doc_round_trips_through_a_plan() {
        let d = doc();
        let plan = d.to_plan(4);
        assert_eq!(plan.version, 4);
        let back = PlacementDoc::from_plan(&plan, d.workers.clone(), "r1", 9);
        assert!(back.same_layout(&d));
        assert_ne!(back, d, "the writer differs");
        assert_eq!(
            d.assigned("w0")["cpu:0"],
            [(0, 1), (1, 2)].into_iter().collect()
        );
        assert!(d.assigned("w1").is_empty());
        let json = serde_json::to_value(&d).unwrap();
        let stored = StoredPlacement {
            version: 4,
            placement: json,
        };
        let spec = tiny_spec();
        assert_eq!(decode(&stored, &spec), Some(d));
        let bad = StoredPlacement {
            version: 5,
            placement: serde_json::json!({"nope": 1}),
        };
        assert_eq!(decode(&bad, &spec), None);
        let mut foreign = doc();
        foreign.devices[0].experts.push((0, 8));
        let stored = StoredPlacement {
            version: 6,
            placement: serde_json::to_value(&foreign).unwrap(),
        };
        let e = decode_checked(&stored, &spec).unwrap_err();
        assert!(e.contains("expert 8 of layer 0"), "{e}");
    }

    /// Found by the `placement_document` fuzz target: the same device twice (another
    /// capacity) was routed to for both expert lists, but `assigned` told its worker to
    /// hold only the second.
    #[test]
    fn a_placement_listing_a_device_twice_is_refused() {
        let text = include_str!(
            "../../../fuzz/regressions/placement_document/invalid-device-listed-twice.json"
        );
        let stored: StoredPlacement = serde_json::from_str(text).unwrap();
        let spec = tiny_spec();
        let e = decode_checked(&stored, &spec).unwrap_err();
        assert_eq!(e, "device w0/cpu:0 is listed twice");
        assert_eq!(decode(&stored, &spec), None);
    }
}
