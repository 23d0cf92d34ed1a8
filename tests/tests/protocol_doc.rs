//! `docs/protocol.md` lists exactly the request and response kinds, error codes, close codes and
//! peer messages the code has, and says which codes are retryable as the code does.

use std::collections::BTreeSet;

use kappakv_protocol::frame::MessageKinds;
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::{ErrorCode, Request, Response};
use kappakv_server::net::close;

const DOC: &str = include_str!("../../docs/protocol.md");

/// The rows of the first table under the heading `## {section}`: each row's cells, trimmed.
fn table(section: &str) -> Vec<Vec<String>> {
    let heading = format!("## {section}\n");
    let start = DOC
        .find(&heading)
        .unwrap_or_else(|| panic!("docs/protocol.md has no section {section:?}"));
    let rows: Vec<Vec<String>> = DOC[start + heading.len()..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // the header and the separator
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert!(!rows.is_empty(), "the {section:?} table is empty");
    rows
}

/// The first cell of each row, without its backticks.
fn names(section: &str) -> BTreeSet<String> {
    table(section)
        .into_iter()
        .map(|row| row[0].trim_matches('`').to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_string()).collect()
}

#[test]
fn the_document_lists_every_request_response_and_peer_message_kind() {
    assert_eq!(names("Requests"), set(Request::KINDS));
    assert_eq!(names("Responses"), set(Response::KINDS));
    assert_eq!(names("Peer messages"), set(PeerMessage::KINDS));
}

#[test]
fn the_document_lists_every_error_code_and_whether_it_is_retryable() {
    let documented: BTreeSet<(String, bool)> = table("Error codes")
        .into_iter()
        .map(|row| {
            let retryable = match row[1].as_str() {
                "yes" => true,
                "no" => false,
                other => panic!("retryable is yes or no, not {other:?}"),
            };
            (row[0].trim_matches('`').to_string(), retryable)
        })
        .collect();
    let code: BTreeSet<(String, bool)> = ErrorCode::ALL
        .iter()
        .map(|c| (format!("{c:?}"), c.retryable()))
        .collect();
    assert_eq!(documented, code);
}

#[test]
fn the_document_lists_the_close_codes() {
    let documented: BTreeSet<u32> = names("Connection close codes")
        .iter()
        .map(|n| n.parse().expect("a close code is a number"))
        .collect();
    let code = BTreeSet::from([
        close::SHUTDOWN,
        close::NOT_A_PEER,
        close::BAD_PROTOCOL,
        close::DUPLICATE,
        close::AUTH_TIMEOUT,
        close::RESYNC,
    ]);
    assert_eq!(documented, code);
}
