//! A connection to one worker: one long-lived `Dispatch` stream carrying tagged requests,
//! a reader task that hands each response to the call waiting for its `request_id`, and
//! unary calls (`Info`, `LoadExperts`) on the same channel. Every call has a deadline
//! (past it: `ExpertError::Deadline`); a broken stream fails every call in flight with
//! `ExpertError::Transport` and is reopened by the next call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_model::{ExpertError, RejectCode};
use moe_proto::v1::expert_service_client::ExpertServiceClient;
use moe_proto::v1::{
    DeviceAssignment, DispatchRequest, DispatchResponse, ExpertRef, InfoRequest, InfoResponse,
    LoadExpertsRequest, UnloadExpertsRequest, WorkerErrorCode,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<DispatchResponse>>>>;

struct Stream {
    tx: mpsc::Sender<DispatchRequest>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// One worker as the router sees it.
pub struct WorkerClient {
    addr: String,
    channel: Channel,
    stream: tokio::sync::Mutex<Option<Arc<Stream>>>,
    next_id: AtomicU64,
    /// gRPC message limit of the dispatch stream, each way.
    max_message_bytes: AtomicUsize,
}

/// No connection to the worker at `addr`, or its stream broke.
fn unavailable(addr: &str, what: impl std::fmt::Display) -> ExpertError {
    ExpertError::Transport(format!("worker {addr}: {what}"))
}

/// Why a worker refused a dispatch, from the raw `error_code` of its answer; `None`:
/// it did not (OK). A number this build does not know is a refusal kept as it came
/// (`RejectCode::Other`), never a success: the raw field is read, not prost's accessor,
/// which would turn an unknown value into the default, OK.
pub(crate) fn reject_code(raw: i32) -> Option<RejectCode> {
    match WorkerErrorCode::try_from(raw) {
        Ok(WorkerErrorCode::Ok) => None,
        Ok(WorkerErrorCode::InvalidArgument) => Some(RejectCode::InvalidArgument),
        Ok(WorkerErrorCode::NotHosted) => Some(RejectCode::NotHosted),
        Ok(WorkerErrorCode::Unavailable) => Some(RejectCode::Unavailable),
        Err(_) => Some(RejectCode::Other(raw)),
    }
}

impl WorkerClient {
    /// A client for `addr` (`host:port`). Connects lazily; `connect_timeout` bounds each
    /// connection attempt. With `tls`, every connection is mutual TLS, and the worker's
    /// certificate must name `addr`'s host and carry the worker role.
    pub fn new(
        addr: &str,
        connect_timeout: Duration,
        tls: Option<Arc<moe_tls::ClientConfig>>,
    ) -> Result<WorkerClient, ExpertError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unavailable(addr, format!("bad address: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = match tls {
            Some(tls) => endpoint
                .connect_with_connector_lazy(moe_tls::client::Connector::new(tls, connect_timeout)),
            None => endpoint.connect_lazy(),
        };
        Ok(WorkerClient {
            addr: addr.to_owned(),
            channel,
            stream: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            max_message_bytes: AtomicUsize::new(256 << 20),
        })
    }

    /// Sizes the dispatch stream's message limit (from the largest step); applies to
    /// streams opened from now on.
    pub fn set_max_message_bytes(&self, bytes: usize) {
        self.max_message_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn open_stream(&self) -> Result<Arc<Stream>, ExpertError> {
        let mut guard = self.stream.lock().await;
        if let Some(s) = guard.as_ref() {
            if s.alive.load(Ordering::Acquire) {
                return Ok(s.clone());
            }
        }
        let (tx, rx) = mpsc::channel::<DispatchRequest>(64);
        let limit = self.max_message_bytes.load(Ordering::Relaxed);
        let mut client = ExpertServiceClient::new(self.channel.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let mut inbound = client
            .dispatch(ReceiverStream::new(rx))
            .await
            .map_err(|s| {
                unavailable(
                    &self.addr,
                    format!("opening the dispatch stream: {}", s.message()),
                )
            })?
            .into_inner();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let stream = Arc::new(Stream {
            tx,
            pending: pending.clone(),
            alive: alive.clone(),
        });
        let addr = self.addr.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(resp)) => {
                        let waiter = pending
                            .lock()
                            .ok()
                            .and_then(|mut p| p.remove(&resp.request_id));
                        if let Some(w) = waiter {
                            let _ = w.send(resp);
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::warn!(worker = %addr, error = %status.message(), "dispatch stream broke");
                        break;
                    }
                }
            }
            alive.store(false, Ordering::Release);
            // Dropping the senders fails every call still waiting.
            if let Ok(mut p) = pending.lock() {
                p.clear();
            }
        });
        *guard = Some(stream.clone());
        Ok(stream)
    }

    /// Sends one dispatch and waits for its response, at most `deadline`.
    pub async fn dispatch(
        &self,
        mut req: DispatchRequest,
        deadline: Duration,
    ) -> Result<DispatchResponse, ExpertError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req.request_id = id;
        // The stream this call registered with, so a timed-out call can withdraw.
        let mut registered: Option<Pending> = None;
        let work = async {
            let stream = self.open_stream().await?;
            let (tx, rx) = oneshot::channel();
            if let Ok(mut p) = stream.pending.lock() {
                p.insert(id, tx);
            }
            registered = Some(stream.pending.clone());
            if stream.tx.send(req).await.is_err() {
                stream.alive.store(false, Ordering::Release);
                return Err(unavailable(&self.addr, "the dispatch stream is closed"));
            }
            rx.await.map_err(|_| {
                unavailable(&self.addr, "the dispatch stream broke before the response")
            })
        };
        let result = tokio::time::timeout(deadline, work).await;
        match result {
            Ok(r) => r,
            Err(_) => {
                // A silent worker may never answer: forget the call instead of keeping
                // its entry until the stream breaks.
                if let Some(p) = registered {
                    if let Ok(mut p) = p.lock() {
                        p.remove(&id);
                    }
                }
                Err(ExpertError::Deadline {
                    who: format!("worker {}", self.addr),
                    after: deadline,
                })
            }
        }
    }

    /// The worker's devices and hosted experts.
    pub async fn info(&self, deadline: Duration) -> Result<InfoResponse, ExpertError> {
        let mut client = ExpertServiceClient::new(self.channel.clone());
        let mut req = tonic::Request::new(InfoRequest {});
        req.set_timeout(deadline);
        client
            .info(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| unavailable(&self.addr, format!("Info: {}", s.message())))
    }

    /// Asks the worker to drop experts per device.
    pub async fn unload(
        &self,
        version: u64,
        assignments: Vec<(String, Vec<(usize, u32)>)>,
        deadline: Duration,
    ) -> Result<InfoResponse, ExpertError> {
        let mut client = ExpertServiceClient::new(self.channel.clone());
        let mut req = tonic::Request::new(UnloadExpertsRequest {
            placement_version: version,
            assignments: to_assignments(assignments),
        });
        req.set_timeout(deadline);
        client
            .unload_experts(req)
            .await
            .map_err(|s| unavailable(&self.addr, format!("UnloadExperts: {}", s.message())))?
            .into_inner()
            .info
            .ok_or_else(|| unavailable(&self.addr, "UnloadExperts returned no info"))
    }

    /// Asks the worker to load experts per device; returns once they are ready.
    pub async fn load(
        &self,
        version: u64,
        assignments: Vec<(String, Vec<(usize, u32)>)>,
        deadline: Duration,
    ) -> Result<InfoResponse, ExpertError> {
        let mut client = ExpertServiceClient::new(self.channel.clone());
        let mut req = tonic::Request::new(LoadExpertsRequest {
            placement_version: version,
            assignments: to_assignments(assignments),
        });
        req.set_timeout(deadline);
        client
            .load_experts(req)
            .await
            .map_err(|s| unavailable(&self.addr, format!("LoadExperts: {}", s.message())))?
            .into_inner()
            .info
            .ok_or_else(|| unavailable(&self.addr, "LoadExperts returned no info"))
    }
}

fn to_assignments(assignments: Vec<(String, Vec<(usize, u32)>)>) -> Vec<DeviceAssignment> {
    assignments
        .into_iter()
        .map(|(device, experts)| DeviceAssignment {
            device,
            experts: experts
                .into_iter()
                .map(|(l, e)| ExpertRef {
                    layer: l as u32,
                    expert: e,
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_code_reads_back_as_what_the_worker_meant() {
        let errors = [
            ExpertError::Invalid("num_rows".into()),
            ExpertError::NotHosted {
                layer: 1,
                expert: 4,
            },
            ExpertError::Unavailable("device cpu:0 failed and is restarting".into()),
            ExpertError::Deadline {
                who: "device cpu:0".into(),
                after: Duration::from_secs(30),
            },
        ];
        let want = [
            RejectCode::InvalidArgument,
            RejectCode::NotHosted,
            RejectCode::Unavailable,
            RejectCode::Unavailable,
        ];
        for (e, want) in errors.iter().zip(want) {
            // What the worker puts on the wire, read by the router.
            let raw = moe_worker::error::wire_code(e) as i32;
            assert_eq!(reject_code(raw), Some(want), "{e}: code {raw}");
        }
        assert_eq!(reject_code(WorkerErrorCode::Ok as i32), None);
    }

    #[test]
    fn an_unknown_code_from_the_wire_is_a_refusal_not_a_success() {
        for raw in [1, 4, 13, 99, -1, i32::MIN, i32::MAX] {
            assert_eq!(reject_code(raw), Some(RejectCode::Other(raw)), "{raw}");
        }
    }
}
