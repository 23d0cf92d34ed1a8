//! Joining the node that made an invite: dial it (its key pinned), show the invite's secret
//! and a proof of this node's key, and learn where it can be dialled. The node that made the
//! invite adds this one to its peer list as it answers; the caller adds that node to its own.

use std::net::SocketAddr;
use std::time::Duration;

use kappakv_protocol::sign::Keypair;
use kappakv_protocol::{Invite, NodeAddr, NodeId, Request, Response};

use super::live::{addrs_text, connect, exchange};

/// Longest the join waits for the inviting node.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a join failed. Nothing was added on either side.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No address of the invite answered with the inviting node's key.
    #[error("cannot reach the inviting node {node} at {addrs}: {reason}")]
    Unreachable {
        /// The inviting node.
        node: NodeId,
        /// Its addresses, as the invite gives them.
        addrs: String,
        /// The last failure.
        reason: String,
    },
    /// The inviting node refused: a used, expired or unknown invite, or a bad proof.
    #[error("the inviting node refused the invite: {0}")]
    Refused(String),
    /// An invite to this node itself.
    #[error("the invite was made by this node")]
    Itself,
}

/// Joins `keypair`'s node, dialled at `own_addrs`, to the node that made `invite`. Returns that
/// node's id and addresses once it has added this one to its peers.
pub async fn join(
    keypair: &Keypair,
    own_addrs: Vec<String>,
    invite: &Invite,
) -> Result<(NodeId, Vec<String>), JoinError> {
    if invite.node_id == keypair.node_id() {
        return Err(JoinError::Itself);
    }
    let request = Request::Join {
        node_id: keypair.node_id(),
        addrs: own_addrs,
        secret: invite.secret,
        proof: keypair.sign(&Invite::proof(
            &invite.node_id,
            &keypair.node_id(),
            &invite.secret,
        )),
    };
    let unreachable = |reason: String| JoinError::Unreachable {
        node: invite.node_id,
        addrs: addrs_text(&invite.addrs),
        reason,
    };
    let mut last = "the invite has no address".to_string();
    for addr in resolve(&invite.addrs).await {
        let attempt = tokio::time::timeout(JOIN_TIMEOUT, async {
            let (endpoint, conn) = connect(invite.node_id, addr).await?;
            let answer = exchange(&conn, &request).await;
            conn.close(0u32.into(), b"joined");
            endpoint.wait_idle().await;
            answer
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", JOIN_TIMEOUT.as_secs())));
        match attempt {
            Ok(Response::Joined { node_id, addrs }) if node_id == invite.node_id => {
                return Ok((node_id, addrs));
            }
            Ok(Response::Error { message, .. }) => return Err(JoinError::Refused(message)),
            Ok(other) => last = format!("{addr}: unexpected answer {other:?}"),
            Err(e) => last = e,
        }
    }
    Err(unreachable(last))
}

/// The socket addresses of `addrs`, names resolved now.
async fn resolve(addrs: &[NodeAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for addr in addrs {
        match addr {
            NodeAddr::Ip(a) => out.push(*a),
            NodeAddr::Name { host, port } => {
                if let Ok(found) = tokio::net::lookup_host((host.as_str(), *port)).await {
                    out.extend(found);
                }
            }
        }
    }
    out
}
