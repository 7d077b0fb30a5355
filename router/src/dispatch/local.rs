//! [`LocalBackend`]: experts held by device actors of this process (standalone mode).

use std::time::Instant;

use moe_model::{ExpertBackend, ExpertError, MoeRequest};
use tokio::runtime::Handle;

use super::{count_expert_tokens, DispatchConfig};
use crate::metrics::RouterMetrics;

/// Experts held by device actors of this process.
pub struct LocalBackend {
    node: moe_worker::Node,
    rt: Handle,
    cfg: DispatchConfig,
    metrics: RouterMetrics,
}

impl LocalBackend {
    pub fn new(
        node: moe_worker::Node,
        rt: Handle,
        cfg: DispatchConfig,
        metrics: RouterMetrics,
    ) -> LocalBackend {
        LocalBackend {
            node,
            rt,
            cfg,
            metrics,
        }
    }
}

impl ExpertBackend for LocalBackend {
    fn forward(&self, req: &MoeRequest<'_>) -> Result<Vec<f32>, ExpertError> {
        req.validate()?;
        count_expert_tokens(&self.metrics, req);
        let mut backoff = self.cfg.retry_backoff;
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let call = self.node.compute(
                req.layer,
                req.rows.to_vec(),
                req.top_k,
                req.expert_ids.to_vec(),
                req.weights.to_vec(),
            );
            let result = self
                .rt
                .block_on(async { tokio::time::timeout(self.cfg.deadline, call).await });
            self.metrics
                .dispatch
                .with_label_values(&["local"])
                .observe(started.elapsed().as_secs_f64());
            let err = match result {
                Ok(Ok(out)) => return Ok(out),
                // A device that is restarting or did not answer in time may answer a
                // second call; a request it cannot compute will not.
                Ok(Err(e @ (ExpertError::Unavailable(_) | ExpertError::Deadline { .. }))) => e,
                Ok(Err(e)) => return Err(e),
                Err(_) => ExpertError::Deadline {
                    who: "local experts".into(),
                    after: self.cfg.deadline,
                },
            };
            if attempt >= self.cfg.max_retries {
                return Err(err);
            }
            attempt += 1;
            self.metrics
                .dispatch_retries
                .with_label_values(&["local", "unavailable"])
                .inc();
            tracing::warn!(error = %err, attempt, "local expert call failed; retrying");
            std::thread::sleep(backoff);
            backoff *= 2;
        }
    }
}
