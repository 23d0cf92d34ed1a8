//! A small in-process stand-in for a node, speaking the real client wire protocol over loopback
//! QUIC with a pinned self-signed ed25519 certificate. It keeps keys in memory, records every
//! request, and can drop the connection on a chosen request kind.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use kappakv_protocol::frame::{FRAME_HEADER_LEN, decode_body, encode_frame, frame_len};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::{
    ALPN_CLIENT, Change, EntryId, ErrorCode, KeyVersions, NodeId, Request, Response, Status,
    Ticket, Timestamp, Version,
};

#[derive(Default)]
pub struct State {
    pub lsn: u64,
    pub kv: BTreeMap<Vec<u8>, Vec<Version>>,
    pub changes: Vec<Change>,
    pub hellos: usize,
    pub requests: Vec<Request>,
    /// Close the connection instead of answering the next request of this kind.
    pub kill_next: Option<&'static str>,
    /// Then again for the one after it.
    pub kill_after: Option<&'static str>,
    /// Every connection accepted, to drop them all at once.
    pub conns: Vec<quinn::Connection>,
}

pub struct MockNode {
    pub addr: SocketAddr,
    pub node_id: NodeId,
    state: Arc<Mutex<State>>,
    _endpoint: quinn::Endpoint,
}

impl MockNode {
    pub fn start() -> MockNode {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["kappakv".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let node_id = kappakv_protocol::tls::node_id_of_cert(cert.der()).unwrap();
        let key_der = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let mut tls =
            rustls::ServerConfig::builder_with_provider(kappakv_protocol::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key_der.into())
                .unwrap();
        tls.alpn_protocols = vec![ALPN_CLIENT.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (ep, st) = (endpoint.clone(), state.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    st.lock().unwrap().conns.push(conn.clone());
                    serve_connection(conn, node_id, st).await;
                });
            }
        });
        MockNode {
            addr,
            node_id,
            state,
            _endpoint: endpoint,
        }
    }

    pub fn ticket(&self) -> Ticket {
        Ticket {
            node_id: self.node_id,
            addrs: vec![self.addr.into()],
            token: "rw_secret".into(),
        }
    }

    /// Closes every client connection, as a crash or a network cut would.
    pub fn drop_connections(&self) {
        for conn in self.state().conns.drain(..) {
            conn.close(0u32.into(), b"dropped");
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

async fn read_request(recv: &mut quinn::RecvStream) -> Option<Request> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.ok()?;
    let mut body = vec![0u8; frame_len(header, MAX_FRAME_BYTES).ok()?];
    recv.read_exact(&mut body).await.ok()?;
    decode_body(&body).ok()
}

async fn send(send: &mut quinn::SendStream, response: &Response) -> bool {
    send.write_all(&encode_frame(response)).await.is_ok()
}

async fn serve_connection(conn: quinn::Connection, node_id: NodeId, state: Arc<Mutex<State>>) {
    let mut first = true;
    while let Ok((mut tx, mut rx)) = conn.accept_bi().await {
        let Some(request) = read_request(&mut rx).await else {
            return;
        };
        if first {
            first = false;
            let answer = match request {
                Request::Hello { token } if token == "rw_secret" => {
                    state.lock().unwrap().hellos += 1;
                    Response::Hello {
                        node_id,
                        read_only: false,
                    }
                }
                _ => Response::Error {
                    code: ErrorCode::Unauthorized,
                    message: "unknown token".into(),
                },
            };
            send(&mut tx, &answer).await;
            let _ = tx.finish();
            continue;
        }
        {
            let mut st = state.lock().unwrap();
            st.requests.push(request.clone());
            if st.kill_next == Some(request.kind()) {
                st.kill_next = st.kill_after.take();
                conn.close(0u32.into(), b"killed");
                return;
            }
        }
        let state = state.clone();
        tokio::spawn(async move {
            let watch = matches!(request, Request::Watch { .. });
            answer(request, node_id, &state, &mut tx).await;
            if watch {
                // Like the node: a watch runs until the client finishes or stops its side.
                let mut buf = [0u8; 64];
                while let Ok(Some(_)) = rx.read(&mut buf).await {}
            }
            let _ = tx.finish();
        });
    }
}

fn key_versions(st: &State, key: &[u8]) -> KeyVersions {
    let values = st.kv.get(key).cloned().unwrap_or_default();
    let context = values.iter().map(|v| v.id).collect();
    KeyVersions {
        key: key.to_vec(),
        values: values.into_iter().filter(|v| v.value.is_some()).collect(),
        context,
    }
}

async fn answer(
    request: Request,
    node_id: NodeId,
    state: &Mutex<State>,
    tx: &mut quinn::SendStream,
) {
    let frames: Vec<Response> = {
        let mut st = state.lock().unwrap();
        match request {
            Request::Write { ops, .. } => {
                st.lsn += 1;
                let lsn = st.lsn;
                let id = EntryId(entry_id_of_lsn(lsn));
                for op in ops {
                    let version = Version {
                        id,
                        author: node_id,
                        timestamp: Timestamp(lsn),
                        value: op.value,
                    };
                    let kept = st.kv.remove(&op.key).unwrap_or_default();
                    let mut kept: Vec<Version> = match &op.supersedes {
                        None => vec![],
                        Some(ctx) => kept.into_iter().filter(|v| !ctx.contains(&v.id)).collect(),
                    };
                    kept.push(version.clone());
                    st.kv.insert(op.key.clone(), kept);
                    st.changes.push(Change {
                        lsn,
                        key: op.key,
                        version,
                        supersedes: op.supersedes.unwrap_or_default(),
                    });
                }
                vec![Response::Written { lsn, id }]
            }
            Request::Get { key, .. } => vec![Response::Versions(key_versions(&st, &key))],
            Request::Scan { range, limit, .. } => {
                let keys: Vec<Vec<u8>> = st
                    .kv
                    .keys()
                    .filter(|k| range.contains(k))
                    .cloned()
                    .collect();
                let page: Vec<_> = keys.iter().take(limit as usize).collect();
                let mut frames: Vec<Response> = page
                    .iter()
                    .map(|k| Response::Versions(key_versions(&st, k)))
                    .collect();
                let resume_after =
                    (keys.len() > page.len()).then(|| (*page.last().unwrap()).clone().into());
                frames.push(Response::ScanEnd { resume_after });
                frames
            }
            Request::Status => {
                vec![Response::Status(Box::new(Status {
                    node_id: Some(node_id),
                    log_lsn: st.lsn,
                    ..Status::default()
                }))]
            }
            Request::Watch { prefix, from_lsn } => {
                let mut frames = vec![Response::Heartbeat { log_lsn: st.lsn }];
                if let Some(from) = from_lsn {
                    frames.extend(
                        st.changes
                            .iter()
                            .filter(|c| c.lsn > from && c.key.starts_with(&prefix))
                            .cloned()
                            .map(Response::Change),
                    );
                }
                frames
            }
            _ => vec![Response::Error {
                code: ErrorCode::UnknownRequest,
                message: "not in the mock".into(),
            }],
        }
    };
    for frame in &frames {
        if !send(tx, frame).await {
            return;
        }
    }
}

fn entry_id_of_lsn(n: u64) -> [u8; 32] {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id
}
