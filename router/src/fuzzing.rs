//! Fuzzing entry points of the router's inputs: the bodies of the `completion_body`,
//! `chat_body` and `placement_document` `cargo fuzz` targets (`fuzz/fuzz_targets/`), kept
//! here as plain functions so that the workspace test `fuzz_corpus_replay` runs the same
//! code over the committed corpus on every CI run, without an instrumented build.
//!
//! Bodies go through what the HTTP handlers run before anything reaches the engine
//! (parse, refused and unknown fields, model name, prompt forms, `n`, chat template) and
//! then [`crate::request::build`], as [`crate::grpc::Api::start`] does. Placement
//! documents go through what a router does with the etcd value: decode, check against
//! the model, and turn into routes.

use std::collections::HashMap;
use std::sync::OnceLock;

use moe_control::StoredPlacement;
use moe_model::tiny::{config_json, Size, StoreDtype};
use moe_model::{Arch, ModelSpec, SequenceRequest};

use crate::chat_template::ChatTemplate;
use crate::elastic::{decode_checked, PlacementDoc};
use crate::http::errors::ApiError;
use crate::limits::RequestLimits;
use crate::request::Served;

/// The served model: the tiny Mixtral with the demo tokenizer and Mixtral's chat
/// template (roles must alternate, so `raise_exception` is reachable), under the
/// router's default request limits.
struct Model {
    spec: ModelSpec,
    names: Vec<String>,
    template: ChatTemplate,
    limits: RequestLimits,
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let json = config_json(Arch::Mixtral, Size::Tiny, StoreDtype::F32).to_string();
        let spec = match ModelSpec::from_json(&json) {
            Ok(s) => s,
            Err(e) => panic!("the tiny config does not parse: {e}"),
        };
        let template = ChatTemplate::new(
            moe_model::chat_templates::for_arch(Arch::Mixtral).to_owned(),
            moe_model::demo_tokenizer::BOS_TOKEN.to_owned(),
            moe_model::demo_tokenizer::EOS_TOKEN.to_owned(),
        );
        match template {
            Ok(template) => Model {
                spec,
                names: vec!["tiny-mixtral".into(), "other-name".into()],
                template,
                limits: RequestLimits::default(),
            },
            Err(e) => panic!("the chat template does not compile: {e}"),
        }
    })
}

fn served() -> Served<'static> {
    let m = model();
    Served {
        tokenizer: moe_model::fuzzing::demo_tokenizer(),
        spec: &m.spec,
        names: &m.names,
        chat_template: Some(&m.template),
        limits: &m.limits,
    }
}

/// Every request must fit the model once built.
fn check_built(m: Served<'_>, seqs: &[SequenceRequest]) {
    for s in seqs {
        assert!(!s.prompt.is_empty());
        assert!(s.prompt.len() <= m.limits.prompt_tokens(m.spec.max_position_embeddings));
        assert!(s.prompt.iter().all(|&t| (t as usize) < m.spec.vocab_size));
        let room = m.spec.max_position_embeddings - s.prompt.len();
        assert!(s.stop.max_tokens >= 1 && s.stop.max_tokens as usize <= room);
    }
}

/// A `POST /v1/completions` body through the handler's checks and `request::build`.
/// Returns the engine requests it would start (one per prompt × `n`).
pub fn completion_body(bytes: &[u8]) -> Result<Vec<SequenceRequest>, ApiError> {
    let m = served();
    let p = crate::http::prepare_completion(m, bytes)?;
    assert_eq!(p.reqs.len(), p.echoes.len());
    assert!(p.reqs.len() <= m.limits.max_choices && p.reqs.len() % p.n == 0);
    let seqs = p
        .reqs
        .into_iter()
        .map(|r| m.build(r).map_err(ApiError::from))
        .collect::<Result<Vec<_>, _>>()?;
    check_built(m, &seqs);
    Ok(seqs)
}

/// A `POST /v1/chat/completions` body through the handler's checks (the conversation
/// rendered and tokenised) and `request::build`. Returns the engine requests (`n`).
pub fn chat_body(bytes: &[u8]) -> Result<Vec<SequenceRequest>, ApiError> {
    let m = served();
    let p = crate::http::prepare_chat(m, bytes)?;
    assert_eq!(p.reqs.len(), p.n);
    let seqs = p
        .reqs
        .into_iter()
        .map(|r| m.build(r).map_err(ApiError::from))
        .collect::<Result<Vec<_>, _>>()?;
    check_built(m, &seqs);
    Ok(seqs)
}

/// The value of `/moe/<cluster>/placement` as a router reads it from etcd: the stored
/// document, the placement decoded and checked against the model, its plan and routes.
/// Returns the decoded placement.
pub fn placement_document(bytes: &[u8]) -> Result<PlacementDoc, String> {
    let spec = &model().spec;
    let stored: StoredPlacement = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let doc = decode_checked(&stored, spec)?;
    let plan = doc.to_plan(stored.version);
    let index: HashMap<String, usize> = doc
        .workers
        .keys()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();
    let routes = crate::dispatch::routes_of(&plan, &index);
    for ((layer, expert), hosts) in &routes {
        assert!(
            spec.moe_layers().any(|l| l == *layer) && (*expert as usize) < spec.moe.num_experts
        );
        assert!(!hosts.is_empty() && hosts.iter().all(|&w| w < index.len()));
        let mut unique = hosts.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            hosts.len(),
            "a worker listed twice for one expert"
        );
    }
    // Routes and what each worker is told to hold (`assigned`) must agree both ways.
    let names: Vec<&String> = doc.workers.keys().collect();
    for (e, hosts) in &routes {
        for &w in hosts {
            let held = doc.assigned(names[w]);
            assert!(
                held.values().any(|s| s.contains(e)),
                "routed {e:?} to {} which does not hold it",
                names[w]
            );
        }
    }
    for id in doc.workers.keys() {
        let assigned = doc.assigned(id);
        assert!(assigned
            .values()
            .flatten()
            .all(|e| routes[e].contains(&index[id])));
    }
    let again: PlacementDoc = serde_json::to_value(&doc)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("a decoded placement does not round-trip: {e}"))?;
    assert_eq!(again, doc);
    Ok(doc)
}
