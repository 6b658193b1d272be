//! `fleetcare claims list`.

use super::table::Table;
use super::{ClaimsArgs, ClaimsCommand, CliError, print};
use crate::views::ClaimView;
use fleetcare_client::pb;

/// The largest page the server hands out; `list` follows every page.
const PAGE_SIZE: i32 = 1000;

pub async fn run(args: ClaimsArgs) -> Result<(), CliError> {
    let mut clients = args.connection.connect().await?;
    let json = args.connection.json;
    match args.command {
        ClaimsCommand::List { holder } => {
            let mut request = pb::ListClaimsRequest {
                page_size: PAGE_SIZE,
                page_token: String::new(),
                holder: holder.unwrap_or_default(),
            };
            let mut claims = Vec::new();
            loop {
                let page = clients
                    .dispatch
                    .list_claims(request.clone())
                    .await?
                    .into_inner();
                claims.extend(page.claims.iter().map(ClaimView::from));
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            print(json, &claims, || claims_table(&claims))
        }
    }
}

fn claims_table(claims: &[ClaimView]) -> String {
    let mut table = Table::new(["AGENT", "CLAIM", "HOLDER", "TOKEN", "SLOT", "LEASE EXPIRES"]);
    for c in claims {
        table.row(vec![
            c.agent_id.clone(),
            c.claim_id.clone(),
            c.holder.clone(),
            c.fencing_token.to_string(),
            c.slot_type.clone(),
            c.lease_expires_at.clone().unwrap_or_default(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_one_row_under_the_header() {
        let claim = ClaimView::from(&pb::Claim {
            claim_id: "c-1".into(),
            agent_id: "a-1".into(),
            fencing_token: 42,
            slot_type: pb::SlotType::Work as i32,
            holder: "sched-a".into(),
            claimed_at: None,
            lease_expires_at: Some(prost_types::Timestamp {
                seconds: 1_775_037_600,
                nanos: 0,
            }),
            request_id: String::new(),
        });
        assert_eq!(
            claims_table(&[claim]),
            "AGENT  CLAIM  HOLDER   TOKEN  SLOT  LEASE EXPIRES\n\
             a-1    c-1    sched-a  42     WORK  2026-04-01T10:00:00.000Z\n"
        );
        assert_eq!(
            claims_table(&[]),
            "AGENT  CLAIM  HOLDER  TOKEN  SLOT  LEASE EXPIRES\n"
        );
    }
}
